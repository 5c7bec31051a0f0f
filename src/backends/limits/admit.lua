-- Takes per-user slots, atomically, or refuses: for one stream, or for a batch of streams (of
-- one or many users) decided in order, so two streams of one user in a batch see each other.
-- A batch of several users is for one server only: on a Cluster the users' keys sit on
-- different slots, and each admission goes alone.
-- KEYS[2i-1], KEYS[2i]  user i's slot set and revocation key
-- ARGV[1]  the per-user limit
-- ARGV[2]  "1": the pairs below are a fresh registry read; "0": the caller's cached copy
-- ARGV[3]  when the pairs were read (ms, Redis clock)
-- ARGV[4]  how old (ms) a read may be and still count as fresh
-- ARGV[5]  n, the number of admissions
-- ARGV[6 .. 5+2n]  member ("<replica>:<stream>") and token iat of each admission
-- ARGV[6+2n ..]    pairs: replica id, lease expiry (ms, Redis clock) of every registered replica
-- Returns one code per admission: the user's live slot count after admission, 0 when the user
-- is at the limit, -1 when the caller must read the registry again (a member's replica looks
-- dead or unknown in a copy that is not fresh: a replica that renewed since would lose a live
-- slot), -2 when the caller's own lease has run out by Redis's clock (it must renew and reclaim
-- first), -3 when the token was issued before the user's revocation.
-- Fencing is on Redis's clock only: a replica's own expiry only grows through its own renewal,
-- so a cached copy of it is a safe lower bound; another replica's is not, so members of other
-- replicas are removed only on a fresh read, when a live replica (renewing every lease/3)
-- cannot look expired.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
local expiry = {}
for i = 6 + 2 * n, #ARGV, 2 do
  expiry[ARGV[i]] = tonumber(ARGV[i + 1])
end
local fresh = ARGV[2] == '1' and now - tonumber(ARGV[3]) <= tonumber(ARGV[4])
local limit = tonumber(ARGV[1])
local out = {}
for a = 1, n do
  local slots, revoked_key = KEYS[2 * a - 1], KEYS[2 * a]
  local member, issued = ARGV[4 + 2 * a], tonumber(ARGV[5 + 2 * a])
  local code
  local revoked = tonumber(redis.call('GET', revoked_key) or '0') or 0
  local me = string.match(member, '^([^:]+):')
  if issued < revoked then
    code = -3
  elseif not me or not expiry[me] or expiry[me] <= now then
    code = -2
  else
    local members = redis.call('ZRANGE', slots, 0, -1)
    local count = 0
    local dead = {}
    for _, m in ipairs(members) do
      local replica = string.match(m, '^([^:]+):')
      if replica and expiry[replica] and expiry[replica] > now then
        count = count + 1
      elseif fresh then
        dead[#dead + 1] = m
      else
        code = -1
        break
      end
    end
    if not code then
      for _, m in ipairs(dead) do
        redis.call('ZREM', slots, m)
      end
      if count >= limit then
        code = 0
      else
        redis.call('ZADD', slots, now, member)
        code = count + 1
      end
    end
  end
  out[a] = code
end
return out
