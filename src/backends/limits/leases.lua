-- Reads every replica's lease with Redis's clock, without renewing anything.
-- KEYS[1]  the replica registry: ZSET member replica id, score = lease expiry (ms, Redis clock)
-- Returns { now, id1, expiry1, id2, expiry2, ... }.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = { now }
local all = redis.call('ZRANGEBYSCORE', KEYS[1], now - 3600000, '+inf', 'WITHSCORES')
for i = 1, #all do out[#out + 1] = all[i] end
return out
