//! Handle tables: a handle is a token (a number dressed as a pointer, never dereferenced) that
//! maps to an `Arc` of its object. Looking one up clones the `Arc`, so an object freed by one
//! thread while another uses it lives until that use ends, and a freed or foreign token is an
//! error instead of undefined behaviour. Tokens are never reused.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::{ldm_status, Failure, Outcome};

/// The next token of every kind: one sequence, so a handle of one kind is never a valid handle
/// of another. Starts high and steps by 16 so tokens look like aligned addresses to debuggers.
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(0x1000);

pub(crate) struct Handles<H, T> {
    kind: &'static str,
    table: Mutex<Option<HashMap<usize, Arc<T>>>>,
    _handle: PhantomData<fn() -> H>,
}

impl<H, T> Handles<H, T> {
    pub(crate) const fn new(kind: &'static str) -> Self {
        Handles {
            kind,
            table: Mutex::new(None),
            _handle: PhantomData,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<usize, Arc<T>>) -> R) -> R {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        f(table.get_or_insert_with(HashMap::new))
    }

    pub(crate) fn insert(&self, value: T) -> *mut H {
        self.insert_arc(Arc::new(value))
    }

    pub(crate) fn insert_arc(&self, value: Arc<T>) -> *mut H {
        let token = NEXT_TOKEN.fetch_add(16, Ordering::Relaxed);
        self.with(|t| t.insert(token, value));
        token as *mut H
    }

    fn missing(&self, handle: *mut H) -> Failure {
        let what = if handle.is_null() {
            format!("the {} handle is NULL", self.kind)
        } else {
            format!(
                "{handle:p} is not a live {} handle (already freed, or another kind of handle)",
                self.kind
            )
        };
        Failure::new(ldm_status::LDM_ERR_INVALID_HANDLE, what)
    }

    pub(crate) fn get(&self, handle: *mut H) -> Outcome<Arc<T>> {
        self.with(|t| t.get(&(handle as usize)).cloned())
            .ok_or_else(|| self.missing(handle))
    }

    pub(crate) fn remove(&self, handle: *mut H) -> Outcome<Arc<T>> {
        self.with(|t| t.remove(&(handle as usize)))
            .ok_or_else(|| self.missing(handle))
    }
}
