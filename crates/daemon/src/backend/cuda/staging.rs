//! Page-locked host buffers for batch inputs and outputs.
//!
//! A copy from ordinary (pageable) memory to the device goes through a driver
//! bounce buffer, and a copy back to pageable memory blocks the host until it
//! is done. Staging every batch input and output in page-locked memory makes
//! both plain DMA transfers queued on the stream: a batch's inputs go up with
//! no host wait, its outputs come back with one wait at the end of the batch.
//!
//! Buffers are sized when a model is loaded (`CudaBackend::load` reserves
//! them for the model's largest batch) and only grow if a batch is larger
//! than that, so the serving path allocates nothing.

use std::sync::Arc;

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use super::error::{Ctx, GpuError};
use super::tables::Buf;

/// Element types that can be staged: plain values valid as any bit pattern.
pub trait Plain: DeviceRepr + ValidAsZeroBits + Copy + Default {}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Default> Plain for T {}

/// Room for `len` elements with headroom (×1.5), never zero.
fn grown(len: usize) -> usize {
    let need = len.max(1);
    need + need / 2
}

/// Page-locked memory the host writes and the device reads (write-combined:
/// fast to fill, slow to read back, which the host never does).
fn alloc_upload<T: Plain>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<PinnedHostSlice<T>, GpuError> {
    // SAFETY: the contents are written before any copy reads them.
    unsafe { stream.context().alloc_pinned::<T>(len) }.ctx("allocating page-locked host memory")
}

/// Page-locked memory the device writes and the host reads (cached).
fn alloc_readback<T: Plain>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<PinnedHostSlice<T>, GpuError> {
    // SAFETY: the host reads only the prefix a finished copy wrote.
    unsafe { stream.context().alloc_pinned_with_flags::<T>(len, 0) }
        .ctx("allocating page-locked host memory")
}

/// The last queued copy touching a page-locked buffer: an event recorded on
/// the stream right after it, waited on before the buffer is reused or freed.
#[derive(Default)]
struct LastCopy(Option<CudaEvent>);

impl LastCopy {
    fn wait(&self, what: &'static str) -> Result<(), GpuError> {
        match &self.0 {
            Some(e) => e.synchronize().ctx(what),
            None => Ok(()),
        }
    }

    fn record(&mut self, stream: &Arc<CudaStream>, what: &'static str) -> Result<(), GpuError> {
        match &self.0 {
            Some(e) => e.record(stream),
            None => stream.record_event(None).map(|e| self.0 = Some(e)),
        }
        .ctx(what)
    }
}

/// A batch input: filled on the host in page-locked memory, copied to its
/// device buffer asynchronously.
pub struct Staged<T> {
    dev: Buf<T>,
    host: Option<PinnedHostSlice<T>>,
    /// The last copy out of `host`: waited on before `host` is written
    /// again, so a copy still in flight never sees new data.
    copied: LastCopy,
}

impl<T> Default for Staged<T> {
    fn default() -> Self {
        Self {
            dev: Buf::default(),
            host: None,
            copied: LastCopy::default(),
        }
    }
}

impl<T: Plain> Staged<T> {
    /// Room for `len` elements on both sides.
    pub fn reserve(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<(), GpuError> {
        self.dev.reserve(stream, len)?;
        if self.host.as_ref().is_none_or(|h| h.len() < len.max(1)) {
            self.wait()?;
            self.host = None;
            self.host = Some(alloc_upload(stream, grown(len))?);
        }
        Ok(())
    }

    fn wait(&self) -> Result<(), GpuError> {
        self.copied.wait("waiting for a batch upload")
    }

    /// Copies `data` to the front of the device buffer; returns once the copy
    /// is queued.
    pub fn upload(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<(), GpuError> {
        self.reserve(stream, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.wait()?;
        let n = data.len();
        let host = self.host.as_mut().expect("reserved above");
        let staged = host.as_mut_slice().ctx("staging a batch")?;
        staged[..n].copy_from_slice(data);
        let dev = self.dev.get_mut();
        stream
            .memcpy_htod(&staged[..n], &mut dev.slice_mut(..n))
            .ctx("copying a batch to the device")?;
        self.copied.record(stream, "recording a batch upload")
    }

    pub fn get(&self) -> &CudaSlice<T> {
        self.dev.get()
    }
}

/// A batch output: copied from the device into page-locked memory without a
/// host wait; `read` waits for the copy.
pub struct Readback<T> {
    host: Option<PinnedHostSlice<T>>,
    /// Elements the last queued copy brings back.
    len: usize,
    /// The last copy into `host`.
    copied: LastCopy,
}

impl<T> Default for Readback<T> {
    fn default() -> Self {
        Self {
            host: None,
            len: 0,
            copied: LastCopy::default(),
        }
    }
}

impl<T: Plain> Readback<T> {
    pub fn reserve(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<(), GpuError> {
        if self.host.as_ref().is_none_or(|h| h.len() < len.max(1)) {
            // A copy into the old buffer may still be queued (a batch that
            // failed before its wait): it must land before the memory goes.
            self.wait()?;
            self.host = None;
            self.host = Some(alloc_readback(stream, grown(len))?);
        }
        Ok(())
    }

    fn wait(&self) -> Result<(), GpuError> {
        self.copied.wait("waiting for a batch download")
    }

    /// Forgets the last fetch: `read` returns nothing.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Queues a copy of the first `len` elements of `src`.
    pub fn fetch(
        &mut self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<T>,
        len: usize,
    ) -> Result<(), GpuError> {
        self.reserve(stream, len)?;
        self.len = len;
        if len == 0 {
            return Ok(());
        }
        let host = self.host.as_mut().expect("reserved above");
        let dst = host.as_mut_slice().ctx("reading a batch back")?;
        stream
            .memcpy_dtoh(&src.slice(..len), &mut dst[..len])
            .ctx("copying results to the host")?;
        self.copied.record(stream, "recording a batch download")
    }

    /// The fetched elements, once their copy has landed (free after the
    /// batch's stream wait).
    pub fn read(&self) -> Result<&[T], GpuError> {
        self.wait()?;
        match &self.host {
            Some(h) if self.len > 0 => Ok(&h.as_slice().ctx("reading a batch back")?[..self.len]),
            _ => Ok(&[]),
        }
    }
}
