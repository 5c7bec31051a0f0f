-- Takes one per-user slot, atomically, or refuses.
-- KEYS[1]  the user's slot set: ZSET member "<replica>:<stream>", score = admission time (ms)
-- ARGV[1]  the per-user limit
-- ARGV[2]  the member to add
-- ARGV[3..] pairs: replica id, lease expiry (ms, Redis clock) of every registered replica
-- Returns the user's live slot count after admission, or 0 when the user is at the limit.
-- Members of replicas whose lease has passed are removed first: that is how a crashed
-- replica's slots come back without anyone cleaning up.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = {}
for i = 3, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > now then live[ARGV[i]] = true end
end
local count = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local replica = string.match(m, '^([^:]+):')
  if replica and live[replica] then
    count = count + 1
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
if count >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
return count + 1
