-- Takes one per-user slot, atomically, or refuses.
-- KEYS[1]  the user's slot set: ZSET member "<replica>:<stream>", score = admission time (ms)
-- ARGV[1]  the per-user limit
-- ARGV[2]  the member to add
-- ARGV[3]  "1": a replica missing from the pairs is dead; "0": ask again with a fresh registry
-- ARGV[4..] pairs: replica id, lease expiry (ms, Redis clock) of every registered replica
-- Returns the user's live slot count after admission, 0 when the user is at the limit, or -1
-- when a member belongs to a replica the caller's registry copy does not know yet (it may have
-- registered since): the caller re-reads the registry and asks again with ARGV[3] = "1".
-- Members of replicas whose lease has passed are removed first: that is how a crashed
-- replica's slots come back without anyone cleaning up.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local strict = ARGV[3] == '1'
local expiry = {}
for i = 4, #ARGV, 2 do
  expiry[ARGV[i]] = tonumber(ARGV[i + 1])
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if not strict then
  for _, m in ipairs(members) do
    local replica = string.match(m, '^([^:]+):')
    if replica and expiry[replica] == nil then
      return -1
    end
  end
end
local count = 0
for _, m in ipairs(members) do
  local replica = string.match(m, '^([^:]+):')
  if replica and expiry[replica] and expiry[replica] > now then
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
