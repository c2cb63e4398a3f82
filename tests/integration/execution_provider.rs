//! The execution provider is what the operator asked for, or the worker does not start.
//! (No GPU here: this is the CUDA failure path. The device check in BENCHMARKS.md covers success.)

use kiln::configuration::{ExecutionProviderKind, Fallback};
use kiln::inference::ActiveProvider;
use kiln::startup::Application;

use crate::helpers::{repo, shared_metrics_blocking, test_settings, WorkerProcess};

#[test]
fn cuda_requested_but_unavailable_is_a_startup_error_not_a_silent_cpu_fallback() {
    let mut settings = test_settings();
    settings.inference.execution_provider = ExecutionProviderKind::Cuda;
    // The CPU build of ONNX Runtime: CUDA is asked for and cannot start.
    settings.inference.runtime_library = Some(repo().join("runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"));
    let error = Application::build(settings)
        .err()
        .expect("the worker must refuse to start")
        .to_string();
    assert!(error.contains("execution_provider = \"cuda\""), "{error}");
    assert!(error.contains("without CUDA support"), "{error}");
    assert!(
        error.contains("fallback = \"cpu\""),
        "the error says how to allow CPU: {error}"
    );
}

#[test]
fn a_cpu_fallback_runs_only_when_allowed() {
    let mut settings = test_settings();
    settings.inference.execution_provider = ExecutionProviderKind::Cuda;
    settings.inference.fallback = Fallback::Cpu;
    settings.inference.runtime_library = Some(repo().join("runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"));
    let _metrics = shared_metrics_blocking();
    let app = Application::build(settings).expect("fallback = cpu lets it start");
    assert_eq!(app.provider(), ActiveProvider::CpuFallback);
}

#[tokio::test]
async fn the_binary_exits_with_the_reason_and_logs_a_fallback_loudly() {
    let settings = test_settings();
    let mut refused = WorkerProcess::spawn(
        &settings,
        &[
            ("KILN_INFERENCE__EXECUTION_PROVIDER", "cuda"),
            (
                "KILN_INFERENCE__RUNTIME_LIBRARY",
                "runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1",
            ),
        ],
    );
    let status = refused.wait_exit(std::time::Duration::from_secs(60)).await;
    assert!(!status.success());
    assert_eq!(
        refused.count("CUDA execution provider cannot start"),
        1,
        "{}",
        refused.log()
    );
    assert_eq!(refused.count("worker ready"), 0);

    let fallback = WorkerProcess::spawn(
        &settings,
        &[
            ("KILN_INFERENCE__EXECUTION_PROVIDER", "cuda"),
            ("KILN_INFERENCE__FALLBACK", "cpu"),
            (
                "KILN_INFERENCE__RUNTIME_LIBRARY",
                "runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1",
            ),
        ],
    );
    fallback
        .wait_for_log("worker ready", std::time::Duration::from_secs(60))
        .await;
    assert_eq!(fallback.count("\"level\":\"ERROR\""), 1, "{}", fallback.log());
    assert_eq!(fallback.count("CUDA EXECUTION PROVIDER UNAVAILABLE"), 1);
    assert_eq!(
        fallback.count("\"provider\":\"cpu-fallback\""),
        2,
        "model loaded and worker ready both say so"
    );
    drop(fallback);
    crate::helpers::cleanup(&settings).await;
}

#[test]
fn a_missing_runtime_library_says_how_to_get_it() {
    let mut settings = test_settings();
    settings.inference.runtime_library = Some("/nonexistent/libonnxruntime.so.1.31.1".into());
    let error = Application::build(settings).err().unwrap().to_string();
    assert!(error.contains("/nonexistent/libonnxruntime.so.1.31.1"), "{error}");
    assert!(error.contains("scripts/fetch-onnxruntime.sh cpu"), "{error}");
}

mod tensor_io {
    //! `inference.cuda.pinned_io`: batches written into tensors ONNX Runtime allocated and run
    //! through an IoBinding. On a GPU they live in pinned host memory; here the same path runs on
    //! ONNX Runtime's CPU allocator and must render exactly what the default path renders.

    use kiln::configuration::{ExecutionProviderKind, Fallback};
    use kiln::inference::manifest::PipelineSpec;
    use kiln::inference::pipelines::style_bank::{StyleBankInput, StyleBankRunner};
    use kiln::inference::tensor_io::TensorIo;
    use kiln::inference::{Manifest, Runtime};

    use crate::helpers::{repo, test_settings};

    fn runner(runtime: &Runtime, io: TensorIo) -> anyhow::Result<StyleBankRunner> {
        let manifest = Manifest::load(&repo().join("models/multistyle26")).unwrap();
        let PipelineSpec::StyleBank(spec) = manifest.pipeline.clone() else {
            panic!("multistyle26 is a style bank")
        };
        let session = runtime.session(&manifest.dir.join(&spec.file)).unwrap();
        StyleBankRunner::new(session, spec, io)
    }

    /// A 96 × 64 picture (not square, so a swapped width and height would show) and a style.
    fn sample(seed: usize, style: usize) -> StyleBankInput {
        let (width, height) = (96u32, 64u32);
        let image = (0..3 * 96 * 64)
            .map(|i| ((i * 7 + seed * 131) % 251) as f32 / 250.0)
            .collect();
        let mut weights = vec![0.0; 26];
        weights[style] = 1.0;
        StyleBankInput {
            image,
            weights,
            width,
            height,
        }
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn bound_tensors_render_what_views_render_and_each_result_stays_with_its_sample() {
        let runtime = Runtime::init(&test_settings().inference).unwrap();
        let mut views = runner(&runtime, TensorIo::Views).unwrap();
        let mut bound = runner(&runtime, TensorIo::Bound { pinned: None }).unwrap();
        let (a, b, c) = (sample(1, 0), sample(2, 9), sample(3, 25));

        let want = views.run(&[&a, &b, &c]).unwrap();
        assert!(
            max_difference(&want[0], &want[1]) > 0.05 && max_difference(&want[1], &want[2]) > 0.05,
            "different pictures and styles give different results"
        );
        let got = bound.run(&[&a, &b, &c]).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(max_difference(g, w) <= 1e-5, "sample {i}: {}", max_difference(g, w));
        }
        // Reused memory holds no trace of the last batch: another order, another batch size.
        let again = bound.run(&[&c, &a]).unwrap();
        assert!(max_difference(&again[0], &want[2]) <= 1e-5);
        assert!(max_difference(&again[1], &want[0]) <= 1e-5);
    }

    #[test]
    fn a_sample_of_the_wrong_size_fails_its_batch_with_a_reason() {
        let runtime = Runtime::init(&test_settings().inference).unwrap();
        for io in [TensorIo::Views, TensorIo::Bound { pinned: None }] {
            let mut runner = runner(&runtime, io).unwrap();
            let mut short = sample(1, 0);
            short.image.truncate(100);
            let error = runner.run(&[&sample(2, 1), &short]).unwrap_err();
            assert!(error.contains("3x64x96"), "{io:?}: {error}");
        }
    }

    #[test]
    fn pinned_memory_is_asked_for_only_when_cuda_runs() {
        let mut settings = test_settings();
        settings.inference.cuda.pinned_io = true;
        let cpu = Runtime::init(&settings.inference).unwrap();
        assert_eq!(cpu.tensor_io(), TensorIo::Views);
        // Without the CUDA provider there is no pinned allocator: a clear error, not a crash.
        let error = runner(&cpu, TensorIo::Bound { pinned: Some(0) })
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("pinned memory of GPU 0"), "{error}");
        assert!(error.contains("allocator"), "ONNX Runtime's reason: {error}");
    }

    #[test]
    fn a_cpu_fallback_does_not_ask_for_pinned_memory() {
        let mut settings = test_settings();
        settings.inference.execution_provider = ExecutionProviderKind::Cuda;
        settings.inference.fallback = Fallback::Cpu;
        settings.inference.cuda.pinned_io = true;
        settings.inference.runtime_library =
            Some(repo().join("runtime/onnxruntime-1.31.1-cpu/libonnxruntime.so.1.31.1"));
        let runtime = Runtime::init(&settings.inference).unwrap();
        assert_eq!(runtime.tensor_io(), TensorIo::Views);
        let mut runner = runner(&runtime, runtime.tensor_io()).unwrap();
        assert_eq!(runner.run(&[&sample(1, 3)]).unwrap().len(), 1);
    }
}
