-- Renews this replica's lease and reads every replica's lease, in one round trip.
-- KEYS[1]  the replica registry: ZSET member replica id, score = lease expiry (ms, Redis clock)
-- KEYS[2]  HASH replica id -> admin address
-- ARGV[1]  this replica's id
-- ARGV[2]  lease length (ms)
-- ARGV[3]  this replica's admin address (for operators)
-- Returns { previous expiry of this replica or -1, now, id1, expiry1, id2, expiry2, ... }.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
-- Entries dead for an hour are forgotten; the registry stays as small as the fleet.
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
local out = { prev and tonumber(prev) or -1, now }
local all = redis.call('ZRANGEBYSCORE', KEYS[1], now - 3600000, '+inf', 'WITHSCORES')
for i = 1, #all do out[#out + 1] = all[i] end
return out
