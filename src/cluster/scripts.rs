//! The Lua scripts: every read-modify-write on shared state is one atomic script, and time
//! comes from the Redis server (`TIME`), never from an instance's clock.

use std::sync::LazyLock;

use redis::Script;

/// `KEYS[1]` affinity key, `ARGV[1]` the caller's choice, `ARGV[2]` TTL ms. Sets the binding
/// if there is none (set-if-absent) and returns the binding in force (the winner's choice
/// when several instances race), refreshing its TTL.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
",
    )
});

/// `KEYS[1]` affinity key, `ARGV[1]` the account the caller saw (unusable), `ARGV[2]` the
/// replacement, `ARGV[3]` TTL ms. Compare-and-set: moves the binding only if it still names
/// `ARGV[1]` (or is gone); returns the binding in force. Two instances that both saw the old
/// account cannot flip-flop: the second one gets the first one's replacement.
pub static MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return ARGV[2]
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return v
",
    )
});

/// `KEYS[1]` a client key's lease set, `ARGV[1]` member, `ARGV[2]` limit, `ARGV[3]` TTL ms.
/// Drops expired leases, then adds this one if the key is below its limit. 1 = granted.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// `KEYS[1]` a client key's lease set, `ARGV[1]` TTL ms, `ARGV[2..]` this instance's members
/// there. Extends them (re-adding any the server lost) and drops expired ones.
pub static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
",
    )
});
