//! Kernel launches: the argument interface of cudarc's launch builder (`.arg(&params)`,
//! `.arg(&mut out)`), and a launch that sets programmatic dependent launch (pdl.rs) for
//! the entries that may take it, which cudarc's builder cannot (it has no launch
//! attributes).

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::sys::{
    self, CUdeviceptr, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig,
};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
    LaunchConfig,
};

use super::device::Device;
use crate::backend::abi;
use crate::backend::ptx::Kernel;

/// Most parameters a kernel of ours takes (the attention kernels: 12).
const MAX_ARGS: usize = 24;

/// One launch being put together: `Device::launch_builder(kernel).arg(..)...launch(cfg)`.
pub struct KernelLaunch<'a> {
    dev: &'a Device,
    kernel: Kernel,
    /// What cuLaunchKernel reads: a pointer to each parameter's value, in order.
    params: Vec<*mut c_void>,
    /// The device-pointer values that `params` points into for buffer arguments; boxed so
    /// that the addresses stay put while the builder moves.
    device_ptrs: Box<[CUdeviceptr; MAX_ARGS]>,
    n_device_ptrs: usize,
    /// The host values `params` points into are borrowed for the builder's lifetime.
    _borrows: PhantomData<&'a ()>,
}

/// What one kernel parameter is: a host value read where it lies, or a device buffer
/// whose address is the parameter.
pub enum ArgValue<'a> {
    Host(*const c_void, PhantomData<&'a ()>),
    Device(CUdeviceptr),
}

/// A value a kernel takes as one parameter.
pub trait LaunchArg<'a> {
    fn value(self, dev: &Device) -> ArgValue<'a>;
}

/// Plain values passed by copy (the `#[repr(C)]` parameter structs of kernels/abi.h and
/// numbers), as cudarc's `DeviceRepr`; a trait of ours so that device buffers, which
/// are not one, can have their own `LaunchArg`.
///
/// # Safety
/// The type's bytes must be what the kernel parameter expects.
pub unsafe trait HostArg: DeviceRepr {}

macro_rules! host_args {
    ($($t:ty),* $(,)?) => { $(unsafe impl HostArg for $t {})* };
}
host_args!(
    u32,
    u64,
    i32,
    f32,
    abi::QilinArgmaxParams,
    abi::QilinAttentionParams,
    abi::QilinBiasParams,
    abi::QilinCopyColsParams,
    abi::QilinDequantParams,
    abi::QilinGatherRowsParams,
    abi::QilinGemvParams,
    abi::QilinPenaltyParams,
    abi::QilinQuantGemvParams,
    abi::QilinRmsNormParams,
    abi::QilinRopeParams,
    abi::QilinSampleParams,
    abi::QilinSampleSplitParams,
    abi::QilinSiluMulParams,
);

impl<'a, T: HostArg> LaunchArg<'a> for &'a T {
    fn value(self, _dev: &Device) -> ArgValue<'a> {
        ArgValue::Host(self as *const T as *const c_void, PhantomData)
    }
}

macro_rules! device_args {
    ($($t:ty => $method:ident),* $(,)?) => {$(
        impl<'a, 'b, T> LaunchArg<'a> for $t {
            fn value(self, dev: &Device) -> ArgValue<'a> {
                // Event tracking is off (Device::open), so the guard does nothing.
                let (ptr, _guard) = self.$method(&dev.stream);
                ArgValue::Device(ptr)
            }
        }
    )*};
}
device_args!(
    &'a CudaSlice<T> => device_ptr,
    &'a mut CudaSlice<T> => device_ptr_mut,
    &'a CudaView<'b, T> => device_ptr,
    &'a mut CudaViewMut<'b, T> => device_ptr_mut,
);

impl Device {
    /// A launch of `kernel` on the device's stream (every kernel must be in
    /// `ptx::KERNELS`, as for `function`).
    pub fn launch_builder(&self, kernel: Kernel) -> KernelLaunch<'_> {
        KernelLaunch {
            dev: self,
            kernel,
            params: Vec::with_capacity(MAX_ARGS),
            device_ptrs: Box::new([0; MAX_ARGS]),
            n_device_ptrs: 0,
            _borrows: PhantomData,
        }
    }
}

impl<'a> KernelLaunch<'a> {
    /// The next parameter, in the kernel's order.
    pub fn arg(&mut self, arg: impl LaunchArg<'a>) -> &mut Self {
        assert!(
            self.params.len() < MAX_ARGS,
            "{}: more than {MAX_ARGS} parameters",
            self.kernel.entry
        );
        match arg.value(self.dev) {
            ArgValue::Host(ptr, _) => self.params.push(ptr as *mut c_void),
            ArgValue::Device(ptr) => {
                let slot = &mut self.device_ptrs[self.n_device_ptrs];
                *slot = ptr;
                self.params.push(slot as *mut CUdeviceptr as *mut c_void);
                self.n_device_ptrs += 1;
            }
        }
        self
    }

    /// Queues the kernel; with programmatic dependent launch where `Device::dependent_launch`
    /// says the entry may take it.
    ///
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the parameters must be what the kernel expects,
    /// and the buffers must stay alive until the kernel has run.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.dev.ctx.bind_to_thread()?;
        let function = self.dev.function(self.kernel).cu_function();
        let stream = self.dev.stream.cu_stream();
        if !self.dev.dependent_launch(self.kernel) {
            return cudarc::driver::result::launch_kernel(
                function,
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                stream,
                &mut self.params,
            );
        }
        // SAFETY: a zeroed attribute is a valid value of the union; the one field set is
        // the one its id names.
        let mut attribute: CUlaunchAttribute = std::mem::zeroed();
        attribute.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        sys::cuLaunchKernelEx(&config, function, self.params.as_mut_ptr(), std::ptr::null_mut())
            .result()
    }
}
