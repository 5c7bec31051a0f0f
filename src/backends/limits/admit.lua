-- Takes one per-user slot, atomically, or refuses.
-- KEYS[1]  the user's slot set: ZSET member "<replica>:<stream>", score = admission time (ms)
-- KEYS[2]  the user's revocation: tokens issued before this (unix seconds) are refused
-- ARGV[1]  the per-user limit
-- ARGV[2]  the member to add ("<caller's replica id>:<stream>")
-- ARGV[3]  "1": the pairs below are a fresh registry read; "0": the caller's cached copy
-- ARGV[4]  when the pairs were read (ms, Redis clock)
-- ARGV[5]  how old (ms) a read may be and still count as fresh
-- ARGV[6]  when the stream's token was issued (its iat, unix seconds; 0 without one)
-- ARGV[7..] pairs: replica id, lease expiry (ms, Redis clock) of every registered replica
-- Returns the user's live slot count after admission, 0 when the user is at the limit, -1 when
-- the caller must read the registry again (a member's replica looks dead or unknown in a copy
-- that is not fresh: a replica that renewed since would lose a live slot), or -2 when the
-- caller's own lease has run out by Redis's clock (it must renew and reclaim first), -3 when
-- the token was issued before the user's revocation.
-- Fencing is on Redis's clock only: a replica's own expiry only grows through its own renewal,
-- so a cached copy of it is a safe lower bound; another replica's is not, so members of other
-- replicas are removed only on a fresh read, when a live replica (renewing every lease/3)
-- cannot look expired.
local revoked = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if tonumber(ARGV[6]) < revoked then
  return -3
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = {}
for i = 7, #ARGV, 2 do
  expiry[ARGV[i]] = tonumber(ARGV[i + 1])
end
local me = string.match(ARGV[2], '^([^:]+):')
if not me or not expiry[me] or expiry[me] <= now then
  return -2
end
local fresh = ARGV[3] == '1' and now - tonumber(ARGV[4]) <= tonumber(ARGV[5])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local count = 0
local dead = {}
for _, m in ipairs(members) do
  local replica = string.match(m, '^([^:]+):')
  if replica and expiry[replica] and expiry[replica] > now then
    count = count + 1
  elseif fresh then
    dead[#dead + 1] = m
  else
    return -1
  end
end
for _, m in ipairs(dead) do
  redis.call('ZREM', KEYS[1], m)
end
if count >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
return count + 1
