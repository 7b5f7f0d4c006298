//! Device faults as errors, never as panics.
//!
//! wgpu reports errors that no error scope catches to the device's "uncaptured error" handler,
//! whose default panics, and reports a lost device (driver reset, GPU removed, `destroy`) through a
//! callback. We record both and turn them into an [`Error`] at the next point where the engine
//! talks to the device (allocation, submit, wait), so a library caller gets `Err` and can open a
//! new `Gpu`, and a server keeps serving.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Default)]
pub(crate) struct Faults {
    /// Why the device was lost, once it is: permanent.
    lost: Mutex<Option<String>>,
    /// The first uncaptured error since the last check: reported once.
    uncaptured: Mutex<Option<String>>,
}

impl Faults {
    /// Install the handlers on `device`.
    pub(crate) fn install(device: &wgpu::Device) -> Arc<Faults> {
        let faults = Arc::new(Faults::default());
        let sink = faults.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));
        let sink = faults.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = sink.lost.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| format!("{reason:?}: {message}"));
        });
        faults
    }

    /// `Err` if the device is lost (every time) or an error went uncaptured since the last check.
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::Device(format!(
                "the GPU device was lost ({why}); open a new engine to continue"
            )));
        }
        if let Some(e) = self
            .uncaptured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(Error::Device(e));
        }
        Ok(())
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}
