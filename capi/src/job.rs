//! Asynchronous generations: a job runs on its own thread; the caller polls, waits or cancels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::ldm_status::*;
use crate::request::{run, Output, OwnedRequest};
use crate::{
    catch, guard, ldm_model, ldm_request, ldm_result, ldm_status, out, Failure, Outcome, JOBS,
    MODELS, RESULTS,
};

/// A generation running on its own thread (`ldm_generate_async`).
pub struct ldm_job {
    _opaque: [u8; 0],
}

pub(crate) struct Job {
    cancel: AtomicBool,
    /// `None` while running; then the outcome, until `ldm_job_wait` takes the images.
    outcome: Mutex<Option<Outcome<Option<Output>>>>,
    done: Condvar,
}

impl Job {
    fn finish(&self, outcome: Outcome<Output>) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(outcome.map(Some));
        self.done.notify_all();
    }
}

/// Starts a generation on a new thread and returns at once with `*job`, a new handle (free it
/// with `ldm_job_free`). The request is copied before this returns. `request->progress` is
/// called on the job's thread, so it must be safe to call from another thread with its
/// `user_data`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn ldm_generate_async(
    model: *mut ldm_model,
    request: *const ldm_request,
    job: *mut *mut ldm_job,
) -> ldm_status {
    guard(|| {
        let slot = out(job, "job")?;
        *slot = std::ptr::null_mut();
        let m = MODELS.get(model)?;
        let request = OwnedRequest::from_c(request, &m.path)?;
        let state = Arc::new(Job {
            cancel: AtomicBool::new(false),
            outcome: Mutex::new(None),
            done: Condvar::new(),
        });
        let worker = state.clone();
        std::thread::Builder::new()
            .name("ldm-job".into())
            .spawn(move || {
                let outcome = catch(|| run(&m, request, &worker.cancel));
                worker.finish(outcome);
            })
            .map_err(|e| Failure::new(LDM_ERR_DEVICE, format!("cannot start a thread: {e}")))?;
        *slot = JOBS.insert_arc(state);
        Ok(())
    })
}

/// Asks a job to stop: it ends with LDM_ERR_CANCELLED after the step running now (or before
/// its first step, or, during the final decode, with its images discarded). Returns at once;
/// safe from any thread at any time, also after the job ended (then it changes nothing).
#[no_mangle]
pub extern "C" fn ldm_cancel(job: *mut ldm_job) -> ldm_status {
    guard(|| {
        JOBS.get(job)?.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// LDM_PENDING while the job runs; once it has ended, its final status (LDM_OK, or the failure,
/// whose message `ldm_last_error` then gives on this thread). Never blocks. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_job_poll(job: *mut ldm_job) -> ldm_status {
    guard(|| {
        let j = JOBS.get(job)?;
        let slot = j.outcome.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            None => Err(Failure::new(LDM_PENDING, "the job is still running")),
            Some(Ok(_)) => Ok(()),
            Some(Err(f)) => Err(f.clone()),
        }
    })
}

/// Waits for the job to end and returns its status. On LDM_OK, `*result` is a new result handle
/// (free it with `ldm_result_free`) the first time; a later wait gives LDM_ERR_INVALID_ARGUMENT
/// (the images were taken). `result` may be NULL to only wait. Thread-safe; must not be called
/// from the job's own progress callback.
#[no_mangle]
pub unsafe extern "C" fn ldm_job_wait(
    job: *mut ldm_job,
    result: *mut *mut ldm_result,
) -> ldm_status {
    guard(|| {
        // SAFETY: null or writable (header).
        let result = unsafe { result.as_mut() };
        let j = JOBS.get(job)?;
        let mut slot = j.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while slot.is_none() {
            slot = j.done.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
        let Some(result) = result else {
            return match slot.as_ref() {
                Some(Err(f)) => Err(f.clone()),
                _ => Ok(()),
            };
        };
        *result = std::ptr::null_mut();
        match slot.as_mut() {
            Some(Ok(output)) => {
                let output = output.take().ok_or_else(|| {
                    Failure::invalid("the job's result was already taken by ldm_job_wait")
                })?;
                *result = RESULTS.insert(output);
                Ok(())
            }
            Some(Err(f)) => Err(f.clone()),
            None => unreachable!("waited until the job ended"),
        }
    })
}

/// Frees a job handle. A job still running is cancelled and ends on its own (its model stays
/// alive until then); its images are dropped. Thread-safe.
#[no_mangle]
pub extern "C" fn ldm_job_free(job: *mut ldm_job) -> ldm_status {
    guard(|| {
        let j = JOBS.remove(job)?;
        j.cancel.store(true, Ordering::SeqCst);
        Ok(())
    })
}
