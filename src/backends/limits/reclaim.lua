-- Re-asserts this replica's slots for one user: after its lease lapsed, after Redis lost data
-- (a restart, a failover to a replica that had not seen the writes), and periodically.
-- KEYS[1]  the user's slot set
-- ARGV[1]  the per-user limit
-- ARGV[2]  this replica's id
-- ARGV[3]  when the pairs below were read (ms, Redis clock)
-- ARGV[4]  how old (ms) that read may be
-- ARGV[5]  members of this replica admitted before this time (ms) and missing from the list
--          below were released: they are removed (later ones may be admissions in flight)
-- ARGV[6]  n: how many of this replica's members follow, oldest first
-- ARGV[7 .. 6+n]  those members
-- ARGV[7+n ..]    pairs: replica id, lease expiry (ms) of every registered replica
-- Slots other live replicas hold count first (they were admitted while this one was away);
-- this replica keeps its oldest streams up to what is left and returns the members it must
-- close. Returns -1, changing nothing, when the registry read is too old to judge others by.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  return -1
end
local limit = tonumber(ARGV[1])
local me = ARGV[2]
local settled = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local ours = {}
for i = 7, 6 + n do ours[ARGV[i]] = true end
local live = {}
for i = 7 + n, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) > now then live[ARGV[i]] = true end
end
local others = 0
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local m = members[i]
  local replica = string.match(m, '^([^:]+):')
  if replica == me then
    if not ours[m] then
      if tonumber(members[i + 1]) < settled then
        redis.call('ZREM', KEYS[1], m)
      else
        -- An admission still on its way to the list: it counts.
        others = others + 1
      end
    end
  elseif replica and live[replica] then
    others = others + 1
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
local room = limit - others
local evicted = {}
for i = 7, 6 + n do
  if room > 0 then
    redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
    room = room - 1
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    table.insert(evicted, ARGV[i])
  end
end
return evicted
