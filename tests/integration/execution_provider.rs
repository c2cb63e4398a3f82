//! The execution provider is what the operator asked for, or the worker does not start.
//! (No GPU here: this is the CUDA failure path. The device check in BENCHMARKS.md covers success.)

use kiln::configuration::{ExecutionProviderKind, Fallback};
use kiln::inference::ActiveProvider;
use kiln::startup::Application;

use crate::helpers::{repo, test_settings, WorkerProcess};

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
    crate::helpers::delete_topology(&kiln::amqp::Topology::for_settings(&settings)).await;
}

#[test]
fn a_missing_runtime_library_says_how_to_get_it() {
    let mut settings = test_settings();
    settings.inference.runtime_library = Some("/nonexistent/libonnxruntime.so.1.31.1".into());
    let error = Application::build(settings).err().unwrap().to_string();
    assert!(error.contains("/nonexistent/libonnxruntime.so.1.31.1"), "{error}");
    assert!(error.contains("scripts/fetch-onnxruntime.sh cpu"), "{error}");
}
