//! Integration tests: a real RabbitMQ on 127.0.0.1:5672, real ONNX Runtime on CPU, real models.
//! One test binary (one link); nextest runs each test in its own process.

mod helpers;

mod abandoned;
mod bad_input;
mod batching;
mod broker_failover;
mod broker_nodes;
mod cancel_exchange;
mod contract;
mod degrade_steps;
mod diffusion;
mod diffusion_worker;
mod drills;
mod end_to_end;
mod exactly_once;
mod execution_provider;
mod model_rewrite;
mod observability;
mod python_producer;
mod rate_limits;
mod redis_cluster;
mod reliability;
mod signing;
mod step;
mod step_batching;
mod step_worker;
mod tls;
