-- Records that a durable event this replica delivered live is not in the history: the history
-- lost it (a failover to a replica that had not received it yet; events published since may
-- already sit above it). Afterwards any cursor older than that position resumes with a gap
-- instead of silently missing the event.
-- KEYS[1] the history stream, KEYS[2] its epoch key, KEYS[3] the newest lost position,
-- KEYS[4] the newest trimmed position
-- ARGV[1] the epoch the event was delivered in, ARGV[2] its position (ms-seq)
-- Only a missing position of the same epoch above the trimmed and lost lines counts; returns 1
-- if recorded. Kept apart from the trimmed line, which trimming moves on every publish.
-- cmp (ids.lua) is prepended.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
if ARGV[2] == '0-0' then return 0 end
local lost = redis.call('GET', KEYS[3]) or '0-0'
local trimmed = redis.call('GET', KEYS[4]) or '0-0'
if cmp(ARGV[2], lost) <= 0 or cmp(ARGV[2], trimmed) <= 0 then return 0 end
if cmp(ARGV[2], last) <= 0 and #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0 then
  return 0
end
redis.call('SET', KEYS[3], ARGV[2])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
return 1
