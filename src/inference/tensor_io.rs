//! How runners hand tensors to ONNX Runtime: views of kiln's buffers, or tensors in memory that
//! ONNX Runtime allocated (pinned host memory for CUDA) bound through an `IoBinding`.

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::Tensor;

/// How a runner hands its tensors to ONNX Runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TensorIo {
    /// `session.run` on views of buffers kiln allocated: no extra copy on CPU; with CUDA, ONNX
    /// Runtime copies them to the device from pageable memory (staged, synchronous).
    #[default]
    Views,
    /// An `IoBinding` with the batch written straight into tensors ONNX Runtime allocated, and the
    /// output bound to the same memory: page-locked host memory of GPU `pinned` (`CudaPinned`, which
    /// the GPU reads and writes by DMA), or ONNX Runtime's CPU allocator when `pinned` is `None`.
    Bound {
        /// The CUDA device whose pinned host memory holds the tensors.
        pinned: Option<i32>,
    },
}

/// The memory of [`TensorIo::Bound`]: an allocator for input tensors, and where outputs go.
pub struct BoundIo {
    allocator: Allocator,
    output: MemoryInfo<'static>,
}

impl BoundIo {
    /// Pinned host memory of CUDA device `pinned` (the session must run on CUDA), or ONNX
    /// Runtime's CPU allocator when `None`.
    pub fn new(session: &Session, pinned: Option<i32>) -> ort::Result<Self> {
        let (input, output) = match pinned {
            Some(device) => (
                MemoryInfo::new(
                    AllocationDevice::CUDA_PINNED,
                    device,
                    AllocatorType::Device,
                    MemoryType::CPUInput,
                )?,
                MemoryInfo::new(
                    AllocationDevice::CUDA_PINNED,
                    device,
                    AllocatorType::Device,
                    MemoryType::CPUOutput,
                )?,
            ),
            None => (
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)?,
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)?,
            ),
        };
        Ok(Self {
            allocator: Allocator::new(session, input)?,
            output,
        })
    }

    /// Where to bind outputs (`IoBinding::bind_output_to_device`).
    pub fn output(&self) -> &MemoryInfo<'static> {
        &self.output
    }

    /// A tensor of `shape` from the allocator, filled with the samples (each `shape[1..]`) in order.
    pub fn tensor<'s>(&self, shape: &[usize], samples: impl Iterator<Item = &'s [f32]>) -> ort::Result<Tensor<f32>> {
        let mut tensor = Tensor::<f32>::new(&self.allocator, shape.to_vec())?;
        let (_, data) = tensor.extract_tensor_mut();
        for (chunk, sample) in data.chunks_exact_mut(shape[1..].iter().product()).zip(samples) {
            chunk.copy_from_slice(sample);
        }
        Ok(tensor)
    }
}
