-- Revokes a user's older tokens, on every replica at once.
-- KEYS[1]  the user's revocation key (beside their slot set, on the same slot)
-- ARGV[1]  tokens issued before this (unix seconds) are refused
-- ARGV[2]  how long (ms) the revocation is kept
-- Keeps the later of the stored and the new time, so an older request never undoes a newer
-- one; returns the time in force.
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local before = math.max(current, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], before, 'PX', ARGV[2])
return before
