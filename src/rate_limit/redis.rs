//! The fleet-wide limiter: one Lua script, one round trip, per decision.
//!
//! On one Redis server, or on a Redis Cluster (`rate_limit.redis_mode = "cluster"`): every key of a
//! user shares the hash tag `{u:<user>}`, so a decision is one script on the master that owns the
//! user's slot. The `redis` crate's cluster client routes it there, follows MOVED and ASK, and
//! learns the new slot map when a replica takes over from a failed master. Scripts are not
//! replicated: a promoted replica answers NOSCRIPT once and the script is loaded again.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, ClientTlsConfig, Cmd, Pipeline, RedisFuture, TlsCertificates, Value};

use super::settings::{RateLimitSettings, RedisMode};
use super::{Scope, Verdict};

const DAY_MS: i64 = 86_400_000;

/// The Redis keys of one user. They share the hash tag `{<user>}`, so one decision touches one
/// Redis Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    /// The tier record (billing writes it).
    pub tier: String,
    /// GCRA state.
    pub gcra: String,
    /// Units spent on the UTC day of `now`.
    pub quota: String,
    /// In-flight leases.
    pub leases: String,
}

impl UserKeys {
    /// The key that says request `request_id` of `user` was charged.
    pub fn charged(prefix: &str, user: &str, request_id: &str) -> String {
        format!("{prefix}:{{u:{user}}}:charged:{request_id}")
    }

    /// The key that holds the final outcome of request `request_id` of `user`.
    pub fn outcome(prefix: &str, user: &str, request_id: &str) -> String {
        format!("{prefix}:{{u:{user}}}:outcome:{request_id}")
    }

    /// Keys for `user` at `now_ms`.
    pub fn new(prefix: &str, user: &str, now_ms: i64) -> Self {
        // "u:" keeps the hash tag non-empty even for an id that starts with "}".
        let base = format!("{prefix}:{{u:{user}}}");
        Self {
            tier: format!("{base}:tier"),
            gcra: format!("{base}:gcra"),
            quota: format!("{base}:quota:{}", now_ms.div_euclid(DAY_MS)),
            leases: format!("{base}:leases"),
        }
    }
}

/// Milliseconds from `now_ms` to the end of its UTC day.
pub fn ms_to_day_end(now_ms: i64) -> i64 {
    (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS - now_ms
}

/// The limiter's view of one user, for `kiln limits show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UserState {
    /// The user.
    pub user: String,
    /// The tier record, if billing wrote one.
    pub tier_record: Option<String>,
    /// The tier in force (the record's, or the default).
    pub tier: String,
    /// Units that could be spent right now at the sustained rate with burst.
    pub rate_remaining: u64,
    /// Milliseconds until the burst is full again.
    pub rate_reset_ms: u64,
    /// Units spent today (UTC) and the quota.
    pub quota_used: u64,
    /// Today's quota.
    pub quota: u64,
    /// Leases held now.
    pub in_flight: u64,
    /// The tier's maximum.
    pub max_in_flight: u64,
}

/// The connection to one server or to a cluster; either reconnects by itself.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Connection {
    /// Connect lazily: an absent Redis is not an error here, only at the first command.
    fn open(settings: &RateLimitSettings) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let urls = settings.redis_urls();
        let certificates = tls_certificates(settings)?;
        Ok(match settings.redis_mode {
            RedisMode::Single => {
                let url = urls.first().copied().unwrap_or_default();
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(url, certificates)?,
                    None => redis::Client::open(url)?,
                };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                Connection::Single(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            RedisMode::Cluster => {
                // Few, quick retries: the caller's timeout (`redis_timeout_ms`) and outage policy
                // decide what happens while a slot has no master; retrying longer only delays that.
                let mut builder = ClusterClientBuilder::new(urls)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(100);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let client = builder.build()?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Connection::Cluster(client.get_pending_async_connection_with_config(config))
            }
        })
    }
}

/// The `[rate_limit.tls]` files, read, for `rediss://` URLs; `None` without files (a `rediss://`
/// URL then trusts the system's store).
fn tls_certificates(settings: &RateLimitSettings) -> anyhow::Result<Option<TlsCertificates>> {
    if !settings.tls.is_set() {
        return Ok(None);
    }
    let material = settings.tls.load("rate_limit.tls")?;
    Ok(Some(TlsCertificates {
        client_tls: material.identity.map(|id| ClientTlsConfig {
            client_cert: id.cert,
            client_key: id.key,
        }),
        root_cert: material.ca,
    }))
}

/// Decisions and administration against Redis.
#[derive(Clone)]
pub struct RedisLimiter {
    connection: Connection,
    script: Arc<redis::Script>,
    settings: Arc<RateLimitSettings>,
    /// The tiers as the script's trailing arguments, built once.
    tier_args: Arc<Vec<String>>,
}

impl RedisLimiter {
    /// A limiter that connects lazily and reconnects by itself; it never fails for an absent Redis.
    pub fn new(settings: Arc<RateLimitSettings>) -> anyhow::Result<Self> {
        let connection = Connection::open(&settings)?;
        let mut tier_args = Vec::new();
        for (name, tier) in &settings.tiers {
            tier_args.extend([
                name.clone(),
                format!("{}", tier.interval_ms()),
                tier.burst.to_string(),
                tier.daily_quota.to_string(),
                tier.max_in_flight.to_string(),
            ]);
        }
        Ok(Self {
            connection,
            script: Arc::new(redis::Script::new(include_str!("decide.lua"))),
            settings,
            tier_args: Arc::new(tier_args),
        })
    }

    /// Decide for `user` asking for `cost` units at `now_ms`, holding lease `lease_id` if admitted.
    /// EVALSHA, with EVAL and SCRIPT LOAD on NOSCRIPT (a restarted or new Redis).
    pub async fn decide(&self, user: &str, cost: u64, lease_id: &str, now_ms: i64) -> redis::RedisResult<Verdict> {
        let keys = UserKeys::new(&self.settings.key_prefix, user, now_ms);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&keys.tier)
            .key(&keys.gcra)
            .key(&keys.quota)
            .key(&keys.leases)
            .key(UserKeys::charged(&self.settings.key_prefix, user, lease_id))
            .arg(now_ms)
            .arg(cost)
            .arg(lease_id)
            .arg(self.settings.lease_ttl_ms)
            .arg(ms_to_day_end(now_ms))
            .arg(&self.settings.default_tier)
            .arg(self.settings.request_record_ttl_secs.saturating_mul(1000));
        for a in self.tier_args.iter() {
            invocation.arg(a);
        }
        let mut connection = self.connection.clone();
        let (verdict, scope, tier, limit, remaining, reset_ms, retry_after_ms, unknown): (
            i64,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            String,
        ) = invocation.invoke_async(&mut connection).await?;
        Ok(Verdict {
            admitted: verdict > 0,
            readmitted: verdict == 2,
            scope: match scope.as_str() {
                "in_flight" => Scope::InFlight,
                "daily_quota" => Scope::DailyQuota,
                _ => Scope::Rate,
            },
            tier,
            limit: limit.max(0) as u64,
            remaining: remaining.max(0) as u64,
            reset_ms: reset_ms.max(0) as u64,
            retry_after_ms: retry_after_ms.max(0) as u64,
            unknown_tier_record: (!unknown.is_empty()).then_some(unknown),
            exceeds_tier: scope == "cost",
        })
    }

    /// The final outcome recorded for `request_id` of `user`, if any (see [`crate::outcome`]).
    pub async fn outcome(&self, user: &str, request_id: &str) -> redis::RedisResult<Option<String>> {
        let key = UserKeys::outcome(&self.settings.key_prefix, user, request_id);
        self.connection.clone().get(key).await
    }

    /// Record the final outcome of `request_id` of `user`, for `request_record_ttl_secs`.
    pub async fn record_outcome(&self, user: &str, request_id: &str, record: &str) -> redis::RedisResult<()> {
        let key = UserKeys::outcome(&self.settings.key_prefix, user, request_id);
        self.connection
            .clone()
            .set_ex(key, record, self.settings.request_record_ttl_secs)
            .await
    }

    /// With `rediss://`, one PING at startup, so that a TLS handshake failing on a certificate
    /// (which never heals) is an error naming Redis and the setting to check, rather than an
    /// outage served under `redis_down` for good. Anything else (Redis not up yet, slow) is only
    /// logged: the limiter reconnects by itself when Redis comes.
    pub async fn check_tls(&self) -> anyhow::Result<()> {
        let urls = self.settings.redis_urls();
        if !urls
            .iter()
            .any(|u| u.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("rediss://")))
        {
            return Ok(());
        }
        let server = format!("Redis {}", crate::amqp::connect::redact(&urls.join(",")));
        let wait = (Duration::from_millis(self.settings.redis_timeout_ms) * 4).max(Duration::from_secs(1));
        let mut connection = self.connection.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(wait, ping.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => match crate::tls::diagnose(&error) {
                Some(failure) => Err(anyhow::anyhow!(failure.explain(&server, "rate_limit.tls"))),
                None => {
                    tracing::warn!(%error, redis = %server, "Redis did not answer at startup; the outage policy applies until it does");
                    Ok(())
                }
            },
            Err(_) => {
                tracing::warn!(redis = %server, "Redis did not answer at startup within {wait:?}; the outage policy applies until it does");
                Ok(())
            }
        }
    }

    /// Whether Redis answers (on a cluster: the master of the probe key's slot).
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let key = format!("{}:probe", self.settings.key_prefix);
        let _: bool = self.connection.clone().exists(key).await?;
        Ok(())
    }

    /// Give a lease back (the request is done).
    pub async fn release(&self, user: &str, lease_id: &str) -> redis::RedisResult<()> {
        let keys = UserKeys::new(&self.settings.key_prefix, user, 0);
        self.connection.clone().zrem(&keys.leases, lease_id).await
    }

    /// Set a user's tier (what billing does), with the configured record lifetime.
    pub async fn set_tier(&self, user: &str, tier: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.settings.tiers.contains_key(tier),
            "{tier:?} is not a tier; tiers: {}",
            self.settings.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        let keys = UserKeys::new(&self.settings.key_prefix, user, 0);
        let () = self
            .connection
            .clone()
            .set_ex(&keys.tier, tier, self.settings.tier_record_ttl_secs)
            .await?;
        Ok(())
    }

    /// Forget a user's usage (rate, today's quota, leases); the tier record stays.
    pub async fn reset(&self, user: &str, now_ms: i64) -> redis::RedisResult<()> {
        let keys = UserKeys::new(&self.settings.key_prefix, user, now_ms);
        self.connection
            .clone()
            .del(&[&keys.gcra, &keys.quota, &keys.leases])
            .await
    }

    /// Set `key` for `ttl_ms` unless it exists (`SET NX PX`, atomic): whether it was new. For the
    /// records kept beside the limits on the same connection (signed requests' replay records,
    /// [`crate::auth::replay`]); `key` carries its own hash tag.
    pub async fn set_once(&self, key: &str, ttl_ms: u64) -> redis::RedisResult<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Delete every key under the prefix, on every master; how many there were. For tests and
    /// benchmarks that clean up after themselves: `KEYS` walks the whole keyspace.
    pub async fn delete_all(&self) -> redis::RedisResult<usize> {
        let mut c = self.connection.clone();
        let pattern = format!("{}:*", self.settings.key_prefix);
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut c).await?;
        // One key per DEL: on a cluster, the keys of different users live on different masters.
        for key in &keys {
            let _: () = c.del(key).await?;
        }
        Ok(keys.len())
    }

    /// What the limiter knows of a user, without changing anything.
    pub async fn show(&self, user: &str, now_ms: i64) -> redis::RedisResult<UserState> {
        let keys = UserKeys::new(&self.settings.key_prefix, user, now_ms);
        let mut c = self.connection.clone();
        let (record, tat, used, in_flight): (Option<String>, Option<f64>, Option<u64>, u64) = redis::pipe()
            .get(&keys.tier)
            .get(&keys.gcra)
            .get(&keys.quota)
            .zcount(&keys.leases, format!("({now_ms}"), "+inf")
            .query_async(&mut c)
            .await?;
        let (tier, t) = self.settings.tier_or_default(record.as_deref());
        let busy = tat.map_or(0.0, |tat| (tat - now_ms as f64).max(0.0));
        let capacity = f64::from(t.burst) * t.interval_ms();
        Ok(UserState {
            user: user.to_owned(),
            tier_record: record.clone(),
            tier: tier.to_owned(),
            rate_remaining: ((capacity - busy) / t.interval_ms() + 1e-9).floor().max(0.0) as u64,
            rate_reset_ms: busy.ceil() as u64,
            quota_used: used.unwrap_or(0),
            quota: t.daily_quota,
            in_flight,
            max_in_flight: u64::from(t.max_in_flight),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_and_roll_over_daily() {
        let k = UserKeys::new("kiln", "user-42", 1_795_823_940_000);
        assert_eq!(k.tier, "kiln:{u:user-42}:tier");
        assert_eq!(k.quota, "kiln:{u:user-42}:quota:20784");
        let next_day = UserKeys::new("kiln", "user-42", 1_795_823_940_000 + DAY_MS);
        assert_ne!(k.quota, next_day.quota);
        assert_eq!(ms_to_day_end(0), DAY_MS);
        assert_eq!(ms_to_day_end(DAY_MS - 1), 1);
    }
}
