//! kiln: a worker that keeps GPUs busy turning queued image requests into images.
//!
//! # How a request flows
//!
//! ```text
//!  RabbitMQ <prefix>.requests.<tier> ──► amqp::consume::Consumers (qos per queue, a task per delivery)
//!        │                                  │
//!        │   worker::Worker::handle         ▼  one delivery's journey, a file per step:
//!        │     1. worker::incoming    a signed request's signature (auth) before the body is read;
//!        │                            parse once (domain::GenerationRequest), wait, tier, deferrals;
//!        │                            a replayed signature is acked unanswered (auth::replay, Redis);
//!        │                            worker::outcome: answered already? ack it, nothing else
//!        │     2. worker::admission   deadline, overload policy (scheduling), limits (rate_limit, Redis)
//!        │          └─ worker::defer  over a `defer` limit: copy to a delay queue, `deferred` notice
//!        │     3. worker::render      prepare (cpu_pool) ─► inference::InferenceHandle::infer
//!        │                              ─► inference::engine thread: inference::batcher picks the
//!        │                                 batch, the model kind's pipeline::Runner runs it (ONNX
//!        │                                 Runtime, CPU or CUDA); a multi-step (diffusion) request
//!        │                                 joins engine::steps' running set instead and leaves it
//!        │                                 between steps ─► finish + PNG (cpu_pool)
//!        │                              (worker::watch meanwhile: `progress` notices; a reply queue
//!        │                               that went away or a cancel stops it before its next step)
//!        │     4. worker::reply       amqp::ReplyPublisher::publish (mandatory, publisher confirm),
//!        │                            then worker::outcome records it in Redis (exactly-once effects)
//!        ◄──── 5. worker::settle      the one table: every ending → ack / dead-letter / requeue
//! ```
//!
//! # Where things are
//!
//! - A request is **admitted** in [`worker::admission`] (its deadline, the tier's overload action,
//!   the user's limits through [`rate_limit`]), **batched** in [`inference::batcher`] (driven by the
//!   serve loop in [`inference::engine`]), and its **error becomes a broker action** in
//!   [`worker::settle`].
//! - A **new model kind** goes in [`inference::pipelines`]: a file that implements
//!   [`inference::Pipeline`] (check, prepare, load a [`inference::Runner`], batches, warm-up) on its
//!   manifest section, and one variant in [`inference::manifest::PipelineSpec`]. The multi-step
//!   kind, [`inference::pipelines::diffusion`], plans a request (steps, guidance, size, scheduler),
//!   prepares it (tokens, seed, image) and runs it in phases ([`inference::StepRunner`]: begin,
//!   one UNet call per step for every running row at its own step, VAE decode), which the engine's
//!   step-level scheduler interleaves across requests; its numerics (tokenizer, schedulers, torch's
//!   generator) are in [`diffusion`].
//! - A request is **stopped** (cancelled by its producer, abandoned by it) through [`cancel`]:
//!   a flag the worker checks between stages and the inference thread between steps.
//!
//! # Modules
//!
//! - [`configuration`]: all settings composed, loaded from a file and `KILN_*` variables, validated
//!   once; each section is declared by the module it configures.
//! - [`domain`]: the message contract: requests, replies, ids, error codes, deferral reasons.
//! - [`amqp`]: connection with backoff, topology (tier queues, delay queues, the cancel exchange),
//!   consuming, confirmed reply publishing, whether a reply queue still exists, hearing cancels
//!   ([`amqp::cancel`]).
//! - [`auth`]: signed requests: the `kiln-signature` header (HMAC-SHA256 of the body and the
//!   properties that route it), producers' keys and what each may speak for, replay records.
//! - [`cancel`]: stop flags for requests in flight, and the cancels this worker heard (remembered
//!   `cancel.remember_secs`).
//! - [`worker`]: one delivery from arrival to ack (the five steps above).
//! - [`scheduling`]: tiers' weights, default deadlines and overload actions.
//! - [`rate_limit`]: per-user limits by tier in Redis (one Lua round trip), with an outage policy.
//! - [`inference`]: model manifests and registry, the pipeline seam and the kinds, ONNX Runtime and
//!   execution providers, the inference thread and its batcher.
//! - [`diffusion`]: the CLIP tokenizer, the noise schedulers and torch's CPU generator, each plain
//!   data that a request owns (pausable between steps), checked against diffusers and torch.
//! - [`imaging`]: decoding untrusted images, resizing, tensors, PNG.
//! - [`cpu_pool`]: the lower-priority threads for image work around inference, by tier class.
//! - [`startup`] (assembles the parts), [`shutdown`], [`telemetry`]: process lifecycle.
//! - [`tls`]: the CA and client-certificate files of `amqps://` and `rediss://` connections, and
//!   telling a failed handshake (a startup error) from an unreachable server.
//! - [`observability`]: `/metrics`, `/healthz`, `/readyz`, the fleet heartbeat; [`metrics`] (every
//!   Prometheus metric, declared once in a table), [`gpu`] (NVML), [`trace_context`] (W3C
//!   `traceparent` from requests to replies).
//! - [`submit`]: the producer client (`kiln submit`, `kiln cancel`, `kiln bench`, tests,
//!   benchmarks). The `kiln` command itself (`src/main.rs`, `src/cli/`: `worker`, `submit`,
//!   `cancel`, `bench`, `models`, `limits`) lives in the binary.

pub mod amqp;
pub mod auth;
pub mod cancel;
pub mod configuration;
pub mod cpu_pool;
pub mod diffusion;
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
pub mod tls;
pub mod trace_context;
pub mod worker;
