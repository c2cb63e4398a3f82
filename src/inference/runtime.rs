//! ONNX Runtime: loading the shared library, choosing the execution provider, building sessions.
//!
//! ort's `load-dynamic` feature opens `libonnxruntime.so` at run time, so one kiln binary serves
//! both the CPU build (`onnxruntime==1.31.1`) and the CUDA build (`onnxruntime-gpu==1.31.1`).
//! ONNX Runtime falls back to CPU silently when CUDA cannot start; kiln never does, unless the
//! operator allowed it with `fallback = "cpu"`, and then it says so loudly.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::environment::Environment;

use ort::ep::{self, ExecutionProvider as _};
use ort::session::Session;

use super::settings::{
    ArenaExtendStrategy, ConvAlgorithmSearch, ExecutionProviderKind, Fallback, InferenceSettings, ORT_VERSION,
};

use super::tensor_io::TensorIo;

/// Why inference could not start. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// No library at the configured path.
    #[error(
        "ONNX Runtime library not found at {path}. Fetch the official build with \
         `scripts/fetch-onnxruntime.sh {flavor}` (it downloads {package}=={ORT_VERSION} from PyPI and unpacks \
         libonnxruntime.so into runtime/), or point inference.runtime_library (KILN_INFERENCE__RUNTIME_LIBRARY) at an \
         existing libonnxruntime.so.{ORT_VERSION}"
    )]
    LibraryMissing {
        /// Where kiln looked.
        path: PathBuf,
        /// `cpu` or `cuda`.
        flavor: &'static str,
        /// The PyPI package that carries it.
        package: &'static str,
    },
    /// The library exists but could not be loaded (wrong version, wrong architecture, missing deps).
    #[error("could not load ONNX Runtime from {path}: {reason}")]
    LibraryLoad {
        /// The library.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// CUDA was asked for and is not usable, and no fallback is allowed.
    #[error(
        "execution_provider = \"cuda\" but the CUDA execution provider cannot start: {reason}. \
         Check that inference.runtime_library is the onnxruntime-gpu build (scripts/fetch-onnxruntime.sh cuda), that \
         CUDA 13 and cuDNN 9 libraries are on LD_LIBRARY_PATH, and that GPU {device_id} is visible \
         (nvidia-smi). To run on CPU instead, set execution_provider = \"cpu\", or allow it with fallback = \"cpu\""
    )]
    CudaUnavailable {
        /// What ONNX Runtime said.
        reason: String,
        /// The GPU asked for.
        device_id: i32,
    },
    /// A model file could not be turned into a session.
    #[error("could not load model {path}: {reason}")]
    Model {
        /// The ONNX file.
        path: PathBuf,
        /// What ONNX Runtime said.
        reason: String,
    },
}

/// The execution provider sessions actually run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveProvider {
    /// CPU, as configured.
    Cpu,
    /// CUDA on this device.
    Cuda {
        /// GPU ordinal.
        device_id: i32,
    },
    /// CUDA was asked for and failed; CPU was allowed as a fallback.
    CpuFallback,
}

impl ActiveProvider {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda { .. } => "cuda",
            Self::CpuFallback => "cpu-fallback",
        }
    }
}

/// ONNX Runtime allows one environment per process, and `load-dynamic` one library: every
/// [`Runtime`] in a process shares the first environment (tests build many applications in one
/// process; a worker builds one).
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// The process's ONNX Runtime environment, loading the library at `path` the first time. A later
/// call with another library is an error: it cannot be loaded beside the first.
pub fn environment(path: &Path) -> Result<Environment, StartupError> {
    let load_error = |reason: String| StartupError::LibraryLoad {
        path: path.to_owned(),
        reason,
    };
    let wanted = path.canonicalize().map_err(|e| load_error(e.to_string()))?;
    let mut shared = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, environment)) = shared.as_ref() {
        return match *loaded == wanted {
            true => Ok(environment.clone()),
            false => Err(load_error(format!(
                "this process already runs ONNX Runtime from {}; one library per process",
                loaded.display()
            ))),
        };
    }
    let environment = ort::init_from(&wanted)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("kiln")
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    *shared = Some((wanted, environment.clone()));
    Ok(environment)
}

/// A loaded ONNX Runtime with a decided execution provider; makes sessions.
pub struct Runtime {
    environment: Environment,
    provider: ActiveProvider,
    settings: InferenceSettings,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Load the library and settle the execution provider. For CUDA this builds a probe session so
    /// that a missing driver, library or device fails here, at startup, not on the first request.
    pub fn init(settings: &InferenceSettings) -> Result<Self, StartupError> {
        let path = settings.runtime_library_path();
        if !path.is_file() {
            let (flavor, package) = match settings.execution_provider {
                ExecutionProviderKind::Cpu => ("cpu", "onnxruntime"),
                ExecutionProviderKind::Cuda => ("cuda", "onnxruntime-gpu"),
            };
            return Err(StartupError::LibraryMissing { path, flavor, package });
        }
        let environment = environment(&path)?;

        let mut runtime = Self {
            environment,
            provider: ActiveProvider::Cpu,
            settings: settings.clone(),
        };
        if settings.execution_provider == ExecutionProviderKind::Cuda {
            let device_id = settings.cuda.device_id;
            runtime.provider = ActiveProvider::Cuda { device_id };
            match runtime.probe_cuda() {
                Ok(()) => {}
                Err(reason) if settings.fallback == Fallback::Cpu => {
                    tracing::error!(
                        error = %reason,
                        "CUDA EXECUTION PROVIDER UNAVAILABLE: running on CPU because fallback = \"cpu\"; \
                         throughput will be a small fraction of a GPU's"
                    );
                    runtime.provider = ActiveProvider::CpuFallback;
                }
                Err(reason) => return Err(StartupError::CudaUnavailable { reason, device_id }),
            }
        }
        Ok(runtime)
    }

    /// The provider sessions run on.
    pub fn provider(&self) -> ActiveProvider {
        self.provider
    }

    /// How runners should hand batches to this provider: pinned host memory through an IoBinding
    /// when CUDA runs and `inference.cuda.pinned_io` is set, views of kiln's buffers otherwise.
    pub fn tensor_io(&self) -> TensorIo {
        match self.provider {
            ActiveProvider::Cuda { device_id } if self.settings.cuda.pinned_io => TensorIo::Bound {
                pinned: Some(device_id),
            },
            _ => TensorIo::Views,
        }
    }

    /// A session for `model`, on the active provider.
    pub fn session(&self, model: &Path) -> Result<Session, StartupError> {
        let model_error = |reason: String| StartupError::Model {
            path: model.to_owned(),
            reason,
        };
        let mut builder = Session::builder(&self.environment)
            .map_err(|e| model_error(e.to_string()))?
            .with_intra_op_spinning(self.settings.intra_op_spinning)
            .map_err(|e| model_error(e.to_string()))?;
        if self.settings.intra_threads > 0 {
            builder = builder
                .with_intra_threads(self.settings.intra_threads)
                .map_err(|e| model_error(e.to_string()))?;
        }
        if let ActiveProvider::Cuda { .. } = self.provider {
            builder = builder
                .with_execution_providers([self.cuda_provider()])
                .map_err(|e| model_error(e.to_string()))?;
        }
        builder.commit_from_file(model).map_err(|e| model_error(e.to_string()))
    }

    fn cuda_provider(&self) -> ep::ExecutionProviderDispatch {
        let cuda = &self.settings.cuda;
        let mut provider = ep::CUDA::default()
            .with_device_id(cuda.device_id)
            .with_arena_extend_strategy(match cuda.arena_extend_strategy {
                ArenaExtendStrategy::NextPowerOfTwo => ep::ArenaExtendStrategy::NextPowerOfTwo,
                ArenaExtendStrategy::SameAsRequested => ep::ArenaExtendStrategy::SameAsRequested,
            })
            .with_conv_algorithm_search(match cuda.conv_algorithm_search {
                ConvAlgorithmSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                ConvAlgorithmSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
                ConvAlgorithmSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
            })
            .with_conv_max_workspace(cuda.conv_use_max_workspace)
            .with_tf32(cuda.tf32);
        if cuda.memory_limit_bytes > 0 {
            provider = provider.with_memory_limit(cuda.memory_limit_bytes);
        }
        // Without this, ONNX Runtime logs the failure and quietly runs everything on CPU.
        provider.build().error_on_failure()
    }

    /// Prove the CUDA provider can start: compiled into the library, and registrable on a session
    /// (which loads the provider library, CUDA, cuDNN and opens the device).
    fn probe_cuda(&self) -> Result<(), String> {
        match ep::CUDA::is_available() {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "the ONNX Runtime library at {} was built without CUDA support (it is the CPU build)",
                    self.settings.runtime_library_path().display()
                ))
            }
            Err(e) => return Err(e.to_string()),
        }
        Session::builder(&self.environment)
            .map_err(|e| e.to_string())?
            .with_execution_providers([self.cuda_provider()])
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Check that a session has the inputs and outputs a manifest names.
pub(super) fn check_names(session: &ort::session::Session, inputs: &[&str], outputs: &[&str]) -> anyhow::Result<()> {
    for name in inputs {
        if !session.inputs().iter().any(|i| i.name() == *name) {
            let have: Vec<_> = session.inputs().iter().map(|i| i.name().to_owned()).collect();
            anyhow::bail!("the model has no input {name:?} (it has {have:?})");
        }
    }
    for name in outputs {
        if !session.outputs().iter().any(|o| o.name() == *name) {
            let have: Vec<_> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
            anyhow::bail!("the model has no output {name:?} (it has {have:?})");
        }
    }
    Ok(())
}
