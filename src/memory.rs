//! Kinds of memory and their buffers: what the collectives move and the compute primitives work
//! on. Both seams name buffers through these types and nothing else, so neither needs the other.

/// The buffer types of one kind of memory.
pub trait Memory {
    type F32: Send;
    type I64: Send;
}

/// A buffer of f32 (or i64) values in memory `M`.
pub type F32Buf<M> = <M as Memory>::F32;
pub type I64Buf<M> = <M as Memory>::I64;
/// One shard's rows: embeddings (f32) and labels.
pub type Rows<M> = (F32Buf<M>, I64Buf<M>);
/// One shard's statistics before the all-reduces: max-type and sum-type.
pub type Stats<M> = (F32Buf<M>, F32Buf<M>);

/// Host memory: plain vectors.
pub struct Host;
impl Memory for Host {
    type F32 = Vec<f32>;
    type I64 = Vec<i64>;
}

/// GPU memory: what the CUDA primitives compute on and NCCL moves, each buffer from its GPU's
/// [`Workspace`].
pub struct Device;
impl Memory for Device {
    type F32 = DeviceBuf<f32>;
    type I64 = DeviceBuf<i64>;
}

pub use workspace::{DeviceBuf, Workspace};

mod workspace {
    use crate::error::{Error, Result, Status};
    use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchArgs, PushKernelArg};
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::marker::PhantomData;
    use std::ops::Range;
    use std::sync::Arc;

    /// One GPU's step buffers, kept from step to step: a buffer dropped comes back here under its
    /// purpose and is handed out again for the same purpose when large enough, so once a step of
    /// a shape has run, the next makes no device allocation (a step is the same sequence of
    /// purposes every time), nor does a step up to half as large. A buffer is never handed out for
    /// less than half its size; a larger step allocates and returns what it outgrew to the memory
    /// pool; when the device is full, every buffer not in use goes back there. Everything runs on
    /// the GPU's one stream, so a buffer reused by the next step's work is ordered after the last
    /// step's.
    pub struct Workspace {
        stream: Arc<CudaStream>,
        free: Mutex<HashMap<&'static str, Vec<CudaSlice<u8>>>>,
    }

    impl Workspace {
        pub fn new(stream: Arc<CudaStream>) -> Arc<Workspace> {
            Arc::new(Workspace { stream, free: Mutex::new(HashMap::new()) })
        }

        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// `len` values for `purpose`, not initialised: for buffers whose first writer covers
        /// them in full.
        pub fn take<T: DeviceRepr>(self: &Arc<Self>, len: usize, purpose: &'static str) -> Result<DeviceBuf<T>> {
            let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| Error::invalid(format!("{purpose}: {len} values overflow")))?.max(1);
            let reused = {
                let mut free = self.free.lock();
                let list = free.entry(purpose).or_default();
                // The smallest that holds it, if not more than twice too large (kept from a larger
                // step, a refused one perhaps: it stays for a step of that size).
                let at = (0..list.len()).filter(|&i| list[i].len() >= bytes && list[i].len() / 2 <= bytes).min_by_key(|&i| list[i].len());
                if at.is_none() {
                    // A larger step than before: what it outgrew goes back to the memory pool.
                    list.retain(|b| b.len() > bytes);
                }
                at.map(|i| list.swap_remove(i))
            };
            let raw = match reused {
                Some(raw) => raw,
                None => self.allocate(bytes, purpose)?,
            };
            Ok(DeviceBuf { raw: Some(raw), len, purpose, home: self.clone(), _values: PhantomData })
        }

        /// A new buffer; when the device is full, the buffers kept for other purposes go back to
        /// the memory pool (once the stream has reached their frees) and the allocation is tried
        /// once more.
        fn allocate(&self, bytes: usize, purpose: &'static str) -> Result<CudaSlice<u8>> {
            // SAFETY: handed out as `take` documents: written before it is read.
            let attempt = || unsafe { self.stream.alloc::<u8>(bytes) };
            attempt()
                .or_else(|e| {
                    if self.free.lock().drain().count() == 0 {
                        return Err(e);
                    }
                    self.stream.synchronize()?;
                    attempt()
                })
                .map_err(|e| {
                    Error::new(Status::OutOfMemory, format!("GPU {}: cannot allocate {purpose} ({bytes} bytes): {e}", self.stream.context().ordinal()))
                })
        }

        /// `host` in a buffer for `purpose`.
        pub fn upload<T: DeviceRepr>(self: &Arc<Self>, host: &[T], purpose: &'static str) -> Result<DeviceBuf<T>> {
            let mut buf = self.take::<T>(host.len(), purpose)?;
            if !host.is_empty() {
                self.stream.memcpy_htod(host, &mut buf.view_mut()).map_err(|e| Error::new(Status::Device, format!("CUDA upload of {purpose}: {e}")))?;
            }
            Ok(buf)
        }

    }

    /// `len` values of `T` in a [`Workspace`] buffer, which it returns to on drop.
    pub struct DeviceBuf<T> {
        raw: Option<CudaSlice<u8>>,
        len: usize,
        purpose: &'static str,
        home: Arc<Workspace>,
        _values: PhantomData<T>,
    }

    impl<T: DeviceRepr> DeviceBuf<T> {
        pub fn len(&self) -> usize {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        fn raw(&self) -> &CudaSlice<u8> {
            self.raw.as_ref().expect("present until drop")
        }

        pub fn view(&self) -> CudaView<'_, T> {
            // SAFETY: the buffer holds at least `len` values of T, aligned as every allocation is.
            unsafe { self.raw().transmute::<T>(self.len) }.expect("the buffer holds len values")
        }

        pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
            let len = self.len;
            // SAFETY: as in `view`.
            unsafe { self.raw.as_mut().expect("present until drop").transmute_mut::<T>(len) }.expect("the buffer holds len values")
        }

        pub fn slice(&self, range: Range<usize>) -> CudaView<'_, T> {
            assert!(range.end <= self.len, "{range:?} outside {} values of {}", self.len, self.purpose);
            self.view().slice(range)
        }

        pub fn slice_mut(&mut self, range: Range<usize>) -> CudaViewMut<'_, T> {
            assert!(range.end <= self.len, "{range:?} outside {} values of {}", self.len, self.purpose);
            let mut whole = self.view_mut();
            let part = whole.slice_mut(range);
            // SAFETY: `part` borrows `whole`, a view of memory this buffer holds while `self` is
            // borrowed mutably, which the returned lifetime keeps.
            unsafe { std::mem::transmute::<CudaViewMut<'_, T>, CudaViewMut<'_, T>>(part) }
        }

        /// The device address, for cuBLAS and NCCL.
        pub fn ptr(&self) -> u64 {
            self.raw().device_ptr(&self.home.stream).0
        }
    }

    impl<T> Drop for DeviceBuf<T> {
        fn drop(&mut self) {
            if let Some(raw) = self.raw.take() {
                self.home.free.lock().entry(self.purpose).or_default().push(raw);
            }
        }
    }

    // SAFETY: the kernel receives the buffer's device address, as for the CudaSlice it wraps.
    unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DeviceBuf<T>> for LaunchArgs<'a> {
        fn arg(&mut self, arg: &'b DeviceBuf<T>) -> &mut Self {
            self.arg(arg.raw.as_ref().expect("present until drop"))
        }
    }

    // SAFETY: as above.
    unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut DeviceBuf<T>> for LaunchArgs<'a> {
        fn arg(&mut self, arg: &'b mut DeviceBuf<T>) -> &mut Self {
            self.arg(arg.raw.as_ref().expect("present until drop"))
        }
    }
}
