-- taskmesh ledger: used (sweep.lua is prepended)
local out = {}
for i = 1, #KEYS / 2 do out[i] = sweep(KEYS[2*i-1], KEYS[2*i], now) end
return out
