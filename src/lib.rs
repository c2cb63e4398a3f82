//! kiln: a worker that keeps GPUs busy turning queued image requests into images.
//!
//! # How a request flows
//!
//! ```text
//!  RabbitMQ <prefix>.requests ──► startup::Application (consumer, prefetch)
//!        │                              │ one task per delivery
//!        │                              ▼
//!        │                        worker::Worker::handle
//!        │        domain::GenerationRequest::parse      (bytes → trusted request, or error reply)
//!        │        inference::ModelRegistry::prepare     (cpu_pool: decode, resize, tensor)
//!        │        inference::InferenceHandle::infer ──► inference::engine thread (ONNX Runtime,
//!        │                                               CPU or CUDA; owns every session)
//!        │        inference::Finish::apply + imaging::encode_png   (cpu_pool)
//!        │        amqp::ReplyPublisher::publish         (mandatory, publisher confirm)
//!        ◄─────── ack only after the confirm (worker::settle maps every outcome to ack/reject/requeue)
//! ```
//!
//! # Modules
//!
//! - [`configuration`]: typed settings from a file and `KILN_*` variables.
//! - [`domain`]: the message contract: requests, replies, ids, error codes.
//! - [`amqp`]: connection with backoff, topology, confirmed reply publishing.
//! - [`inference`]: model manifests and registry, ONNX Runtime and execution providers, the
//!   inference thread, the pipelines.
//! - [`imaging`]: decoding untrusted images, resizing, tensors, PNG.
//! - [`rate_limit`]: per-user limits by tier in Redis (one Lua round trip), with an outage policy.
//! - [`worker`]: one delivery from arrival to ack.
//! - [`cpu_pool`]: the lower-priority threads for image work around inference.
//! - [`startup`], [`shutdown`], [`telemetry`]: process lifecycle.
//! - [`observability`]: `/metrics`, `/healthz`, `/readyz`, the fleet heartbeat; [`metrics`] (every
//!   Prometheus metric, recorded from anywhere in one line), [`gpu`] (NVML), [`trace_context`] (W3C
//!   `traceparent` from requests to replies).
//! - [`submit`]: the producer side of `kiln submit`.

pub mod amqp;
pub mod configuration;
pub mod cpu_pool;
pub mod domain;
pub mod gpu;
pub mod imaging;
pub mod inference;
pub mod metrics;
pub mod observability;
pub mod rate_limit;
pub mod scheduling;
pub mod shutdown;
pub mod startup;
pub mod submit;
pub mod telemetry;
pub mod trace_context;
pub mod worker;
