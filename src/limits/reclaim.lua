-- Re-asserts this replica's slots for one user after its lease lapsed or Redis lost its data.
-- KEYS[1]  the user's slot set
-- ARGV[1]  the per-user limit
-- ARGV[2]  this replica's id
-- ARGV[3]  n: how many of this replica's members follow, oldest first
-- ARGV[4 .. 3+n]  those members
-- ARGV[4+n ..]    pairs: replica id, lease expiry (ms) of every registered replica
-- Slots other live replicas hold count first (they were admitted while this one was away);
-- this replica keeps its oldest streams up to what is left and returns the members it must
-- close. Stale members of this replica (releases that never reached Redis) are removed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local me = ARGV[2]
local n = tonumber(ARGV[3])
local ours = {}
for i = 4, 3 + n do ours[ARGV[i]] = true end
local live = {}
for i = 4 + n, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > now then live[ARGV[i]] = true end
end
local others = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local replica = string.match(m, '^([^:]+):')
  if replica == me then
    if not ours[m] then redis.call('ZREM', KEYS[1], m) end
  elseif replica and live[replica] then
    others = others + 1
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
local room = limit - others
local evicted = {}
for i = 4, 3 + n do
  if room > 0 then
    redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
    room = room - 1
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    table.insert(evicted, ARGV[i])
  end
end
return evicted
