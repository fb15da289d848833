-- taskmesh fetch: take a message off its list and record it as unacknowledged in one step,
-- so that a worker dying after Redis answered it leaves the message in kombu's unacked hash.
-- KEYS[1] = kombu's unacked hash, KEYS[2] = its unacked_index zset, KEYS[3 .. 2 + ARGV[2]] =
-- the lists in BRPOP's order (kombu's _brpop_start), then optionally the fetching worker's
-- in-flight set (taskmesh's registry), which gets the delivery tag of what is recorded, so a
-- worker killed before its next announcement is known to have held it.
-- ARGV[1] = the client's time(), the score kombu's QoS.append gives (restore_visible compares
-- it with the client's clock); ARGV[2] = the number of lists; ARGV[3 ..] = '1' for each list
-- whose consumer acknowledges ('0': consumed with no_ack, kombu records nothing).
-- Returns false when every list is empty, else {list number (1 = KEYS[3]), message, recorded}:
-- recorded = 0 for a no_ack list, and for a message kombu cannot record either (no string
-- delivery tag, exchange or routing key), which is left to kombu's own QoS.append, as before.
local lists = tonumber(ARGV[2])
local held = #KEYS > 2 + lists and KEYS[#KEYS]
for i = 3, 2 + lists do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, payload = pcall(cjson.decode, item)
    local props = ok and type(payload) == 'table' and payload['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    if ARGV[i] == '1' and type(info) == 'table' and type(tag) == 'string'
        and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
      -- exactly QoS.append's record, dumps([message._raw, EX, RK]), the message text unchanged
      local record = '[' .. item .. ', ' .. cjson.encode(info['exchange']) .. ', '
        .. cjson.encode(info['routing_key']) .. ']'
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag, record)
      if held then
        redis.call('SADD', held, tag)
      end
      return {i - 2, item, 1}
    end
    return {i - 2, item, 0}
  end
end
return false
