-- kiln: one rate-limit decision for one user, atomically, in one round trip.
--
-- KEYS (all share the user's hash tag, so they live in one Redis Cluster slot):
--   1  <prefix>:{u:<user>}:tier          the user's tier name, written by billing (string)
--   2  <prefix>:{u:<user>}:gcra          GCRA theoretical arrival time, ms (string)
--   3  <prefix>:{u:<user>}:quota:<day>   units spent on this UTC day (integer)
--   4  <prefix>:{u:<user>}:leases        in-flight leases: member = lease id, score = expiry ms (zset)
--   5  <prefix>:{u:<user>}:charged:<id>  this request was charged (string "1", expires)
-- ARGV:
--   1 now (ms, the caller's clock)   2 cost (units)   3 lease id   4 lease ttl (ms)
--   5 ms until the UTC day ends      6 default tier   7 how long a charge is remembered (ms)
--   8.. five per tier: name, emission interval (ms per unit), burst (units), daily quota (units),
--       max in flight
-- Returns {verdict, scope, tier, limit, remaining, reset_ms, retry_after_ms, unknown_tier_record}
--   verdict: 1 admitted, 2 already admitted and charged (a redelivery: its lease still held, or
--   its charge remembered), 0 limited
--   scope: "rate", "daily_quota" or "in_flight" (the limit reported), or "cost" when the cost is
--   more than the tier's burst or daily quota (it could never be admitted; limit = the largest)
-- Nothing is written unless the request is admitted.

local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local lease_id = ARGV[3]
local lease_ttl = tonumber(ARGV[4])
local day_left = tonumber(ARGV[5])
local charge_ttl = tonumber(ARGV[7])

local record = redis.call('GET', KEYS[1])
local tier, interval, burst, quota, max_in_flight
local unknown_record = ''
local function pick(name)
  for i = 8, #ARGV, 5 do
    if ARGV[i] == name then
      return ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    end
  end
end
if record then
  tier, interval, burst, quota, max_in_flight = pick(record)
  if not tier then unknown_record = record end
end
if not tier then
  tier, interval, burst, quota, max_in_flight = pick(ARGV[6])
end

-- A cost no window of this tier can hold is refused outright, never deferred forever.
if cost > burst or cost > quota then
  return {0, 'cost', tier, math.min(burst, quota), 0, 0, 0, unknown_record}
end

local capacity = burst * interval
local tat = tonumber(redis.call('GET', KEYS[2]) or now)
if tat < now then tat = now end

-- In flight: expired leases (crashed workers) stop counting.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZSCORE', KEYS[4], lease_id) then
  -- A redelivery of a request still holding its lease: admitted again, charged nothing.
  redis.call('ZADD', KEYS[4], now + lease_ttl, lease_id)
  redis.call('PEXPIRE', KEYS[4], lease_ttl)
  local remaining = math.floor((capacity - (tat - now)) / interval + 1e-9)
  return {2, 'rate', tier, burst, remaining, math.ceil(tat - now), 0, unknown_record}
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  -- Charged before, its lease since released or expired (a redelivery after a crash, however
  -- late): admitted again, charged nothing, holding a lease again.
  redis.call('ZADD', KEYS[4], now + lease_ttl, lease_id)
  redis.call('PEXPIRE', KEYS[4], lease_ttl)
  local remaining = math.floor((capacity - (tat - now)) / interval + 1e-9)
  return {2, 'rate', tier, burst, remaining, math.ceil(tat - now), 0, unknown_record}
end
local in_flight = redis.call('ZCARD', KEYS[4])
if in_flight >= max_in_flight then
  local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local until_expiry = math.ceil(tonumber(first[2]) - now)
  -- Leases are usually released long before they expire: suggest a short retry.
  return {0, 'in_flight', tier, max_in_flight, 0, until_expiry, math.min(until_expiry, 1000), unknown_record}
end

-- Daily quota.
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + cost > quota then
  return {0, 'daily_quota', tier, quota, math.max(quota - used, 0), day_left, day_left, unknown_record}
end

-- Sustained rate with burst: GCRA, as redis-cell and governor do it.
local new_tat = tat + cost * interval
if new_tat - now > capacity then
  local remaining = math.floor((capacity - (tat - now)) / interval + 1e-9)
  return {0, 'rate', tier, burst, remaining, math.ceil(tat - now), math.ceil(new_tat - now - capacity), unknown_record}
end

-- Admit: charge all three.
redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
redis.call('INCRBY', KEYS[3], cost)
redis.call('PEXPIRE', KEYS[3], day_left + 3600000)
redis.call('ZADD', KEYS[4], now + lease_ttl, lease_id)
redis.call('PEXPIRE', KEYS[4], lease_ttl)
redis.call('SET', KEYS[5], '1', 'PX', charge_ttl)
local remaining = math.floor((capacity - (new_tat - now)) / interval + 1e-9)
return {1, 'rate', tier, burst, remaining, math.ceil(new_tat - now), 0, unknown_record}
