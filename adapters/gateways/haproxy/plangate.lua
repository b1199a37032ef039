-- plangate forward auth for HAProxy 2.6+ (Lua 5.3): the "plangate_check" action.
--
-- Load it in the global section (one copy per thread; this file keeps no shared state):
--
--     lua-load-per-thread /etc/haproxy/plangate.lua
--
-- and call it from a frontend, after removing the client's own X-Plangate-* headers:
--
--     http-request del-header X-Plangate- -m beg
--     http-request lua.plangate_check plangate fail-closed
--
-- Argument 1 is the name of a backend whose servers are plangate gateway processes
-- (`plangate gateway --port 8787`). Only their addresses and health are used: give them a
-- health check on /healthz, so that a plangate that is down is skipped at once instead of
-- costing every request a connection attempt (HAProxy 2.6's httpclient retries a refused
-- connection 3 times, one second apart).
--
-- Argument 2 is the policy when no plangate answers (all servers down, refused connection,
-- timeout, or a 5xx that is not a plangate denial):
--   fail-closed  refuse the request: 503 problem+json "entitlements-unavailable", Retry-After
--   fail-open    let it through to the upstream unchecked: no X-Plangate-* headers, no usage
--
-- What the action does, per request:
--   1. GET http://<plangate>/check with X-Forwarded-Method / X-Forwarded-Uri (the original
--      request) and the caller's token header(s) (TOKEN_HEADERS below).
--   2. 200 (allow): sets X-Plangate-Customer, -Plan, -Reservation on the request to the
--      upstream, and stores the reservation and the quota headers in transaction variables:
--        txn.plangate_reservation     -> the access log line that commits the usage
--        txn.plangate_ratelimit, txn.plangate_ratelimit_policy (and the legacy
--        txn.plangate_x_ratelimit_limit/_remaining/_reset) -> http-after-response set-header
--   3. Any response carrying X-Plangate-Status (a denial: 401, 402, 403, 429, or plangate's
--      own 503 when the identity provider's keys are unreachable): answers the client with
--      that response as it is - status, problem+json body, Retry-After, quota headers - and
--      the request never reaches the upstream.
--   4. Anything else: the fail-open / fail-closed policy (argument 2).

-- Settings ---------------------------------------------------------------------------------

-- Longest wait for /check, in milliseconds (HAProxy's "timeout server" of the call).
local TIMEOUT_MS = 2000

-- Request headers that carry the caller's token, passed to /check as they are. Match
-- plangate.yaml's identity.token_from: "header:Authorization" (the default) needs
-- "authorization"; "header:X-Api-Key" needs "x-api-key"; "cookie:NAME" needs "cookie".
-- Lower case.
local TOKEN_HEADERS = { "authorization" }

-- Headers of the allow response copied onto the client's response (via the variables).
local QUOTA_HEADERS = {
    ["ratelimit"] = "txn.plangate_ratelimit",
    ["ratelimit-policy"] = "txn.plangate_ratelimit_policy",
    ["x-ratelimit-limit"] = "txn.plangate_x_ratelimit_limit",
    ["x-ratelimit-remaining"] = "txn.plangate_x_ratelimit_remaining",
    ["x-ratelimit-reset"] = "txn.plangate_x_ratelimit_reset",
}

-- Headers of the allow response set on the request to the upstream.
local IDENTITY_HEADERS = {
    ["x-plangate-customer"] = "X-Plangate-Customer",
    ["x-plangate-plan"] = "X-Plangate-Plan",
    ["x-plangate-reservation"] = "X-Plangate-Reservation",
}

-- Headers of a denial not copied to the client (HAProxy writes its own).
local HOP_BY_HOP = {
    ["connection"] = true, ["keep-alive"] = true, ["transfer-encoding"] = true,
    ["content-length"] = true, ["date"] = true, ["server"] = true,
}

local FAIL_CLOSED_BODY = '{"type":"https://plangate.dev/problems/entitlements-unavailable",'
    .. '"title":"Entitlements unavailable","status":503,'
    .. '"detail":"the entitlement service cannot be reached; try again later"}'

-- Helpers ----------------------------------------------------------------------------------

-- HAProxy's header tables hold the values of one name at indexes 0, 1, 2, ...
local function values(list)
    local out = {}
    if list == nil then
        return out
    end
    local i = 0
    while list[i] ~= nil do
        out[#out + 1] = list[i]
        i = i + 1
    end
    return out
end

local function first(headers, name)
    return values(headers[name])[1]
end

-- A server can take requests when its check says UP (also "UP 1/2", going down) or when it
-- is not checked at all.
local function usable(server)
    local status = server:get_stats()["status"] or ""
    return status:sub(1, 2) == "UP" or status == "no check"
end

local turn = 0 -- round robin over the usable servers (per thread: good enough)

-- The base URL of a usable plangate server of the backend, or nil.
local function plangate_url(backend_name)
    local backend = core.backends[backend_name]
    if backend == nil then
        core.Alert("plangate: no backend named '" .. backend_name .. "'")
        return nil
    end
    local candidates = {}
    for _, server in pairs(backend.servers) do
        if usable(server) then
            local addr = server:get_addr() -- "10.0.0.5:8787", "::1:8787"
            local host, port = addr:match("^(.*):(%d+)$")
            if host ~= nil and host:find(":", 1, true) then
                addr = "[" .. host .. "]:" .. port -- IPv6 in a URL
            end
            candidates[#candidates + 1] = addr
        end
    end
    if #candidates == 0 then
        return nil
    end
    turn = turn + 1
    return "http://" .. candidates[(turn % #candidates) + 1]
end

-- The policy when plangate gives no answer.
local function unavailable(txn, fail_mode, why)
    if fail_mode == "fail-open" then
        core.Warning("plangate: " .. why .. "; fail-open: request passed unchecked")
        return
    end
    if fail_mode ~= "fail-closed" then
        core.Alert("plangate: unknown failure mode '" .. tostring(fail_mode)
            .. "' (fail-open or fail-closed); failing closed")
    end
    core.Warning("plangate: " .. why .. "; fail-closed: 503")
    local reply = txn:reply()
    reply:set_status(503, "Service Unavailable")
    reply:add_header("content-type", "application/problem+json")
    reply:add_header("retry-after", "5")
    reply:add_header("cache-control", "no-store")
    reply:set_body(FAIL_CLOSED_BODY)
    txn:done(reply)
end

-- The action -------------------------------------------------------------------------------

local function check(txn, backend_name, fail_mode)
    local base = plangate_url(backend_name)
    if base == nil then
        return unavailable(txn, fail_mode, "no plangate server is up in backend " .. backend_name)
    end

    local request_headers = txn.http:req_get_headers()
    local headers = {
        ["x-forwarded-method"] = { txn.f:method() },
        ["x-forwarded-uri"] = { txn.f:pathq() or "/" },
    }
    for _, name in ipairs(TOKEN_HEADERS) do
        local given = values(request_headers[name])
        if #given > 0 then
            headers[name] = given
        end
    end

    local ok, res = pcall(function()
        return core.httpclient():get{ url = base .. "/check", headers = headers, timeout = TIMEOUT_MS }
    end)
    if not ok or res == nil then
        return unavailable(txn, fail_mode, "/check failed: " .. tostring(res))
    end
    local status = tonumber(res.status) or 0
    local answer = res.headers or {}

    if status == 200 then
        -- Allowed. The client's X-Plangate-* were deleted by the config before this action.
        for name, header in pairs(IDENTITY_HEADERS) do
            local value = first(answer, name)
            if value ~= nil then
                txn.http:req_set_header(header, value)
            end
        end
        local reservation = first(answer, "x-plangate-reservation")
        if reservation ~= nil then
            txn:set_var("txn.plangate_reservation", reservation)
        end
        for name, var in pairs(QUOTA_HEADERS) do
            local value = first(answer, name)
            if value ~= nil then
                txn:set_var(var, table.concat(values(answer[name]), ", "))
            end
        end
        return
    end

    if first(answer, "x-plangate-status") ~= nil then
        -- A denial: the problem response goes to the client as plangate wrote it.
        local reply = txn:reply()
        reply:set_status(status, res.reason)
        for name, list in pairs(answer) do
            if not HOP_BY_HOP[name] then
                for _, value in ipairs(values(list)) do
                    reply:add_header(name, value)
                end
            end
        end
        reply:set_body(res.body or "")
        return txn:done(reply)
    end

    -- HAProxy's own 503 (connection refused) or 504 (timeout), or a plangate 5xx (an error,
    -- not a decision), or an unexpected status from whatever answers at that address.
    return unavailable(txn, fail_mode, base .. "/check answered " .. status)
end

core.register_action("plangate_check", { "http-req" }, check, 2)
