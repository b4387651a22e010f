-- An upstream batch has ended (or was never sent): give back what batch_reserve.lua held for it.
-- KEYS: meta, held, calling; ARGV: field
release(KEYS[1], KEYS[2], ARGV[1], KEYS[3])
