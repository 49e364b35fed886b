"""The job queue on Redis (when ``REDIS_URL`` is set), on plain redis-py. Semantics, lanes included, as in
:mod:`backend.jobs.base` and the SQLite queue; the jobs are run by :class:`backend.jobs.worker.Worker`
threads inside the service processes.

Keys, under ``<prefix>:jobs`` (``prefix`` keeps two deployments on one Redis apart):

- ``job:<id>``: a hash per job (project_id, kind, lane, payload JSON, status, attempts, lease, result
  JSON, error, times). Ids come from the counter ``seq``, so they order like SQLite's row ids. A finished
  job's hash expires ``keep_s`` seconds after it finished.
- ``queue:<lane>``: the lane's queued job ids, oldest first (a requeued job goes to the front).
- ``queued:<project>``: a hash kind -> queued job id (at most one queued job per project and kind).
- ``lock:<lane>:<project>``: ``<job id>:<token>`` of the running job of that project and lane.
- ``running``: a sorted set of running job ids by lease expiry (POSIX seconds), for ``requeue_stale``.
- ``project:<project>``: a sorted set of the project's job ids (score = id), for ``jobs(project)``.
- ``counts``: a hash ``<lane>:<state>`` -> number for running, done and failed jobs (queued ones are the
  length of ``queue:<lane>``); ``last_finished`` and ``last_error``: job ids for ``status()``.

Every state change is one Lua script (``redis.register_script``), not a ``WATCH``/``MULTI`` transaction:
a claim must scan its lane's queue for the first job whose (project, lane) lock is free, and with
``WATCH`` that means watching the list and every lock it reads and retrying whenever any of them
changes, so busy workers retry each other in turn, each try several round trips. A script does the scan
and the change as one atomic step on the server: one round trip, no retries, and no half-written state
when a client dies in the middle. The scripts build key names from the prefix (a job's lock from its
project), which needs one Redis server (replicas are fine), not Redis Cluster. Times come from the
caller, as in SQLite, so ``requeue_stale(now=...)`` means the same on both back ends. Give Redis
persistence (AOF) so that jobs survive its restarts. Jobs written by the earlier RQ-based queue
(``rq:job:*`` keys) are not read: the next webhook or Retrieve Predictions enqueues them again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from backend.database import dumps
from backend.labelstudio.ids import project_key

from .base import (
    LANES,
    Job,
    LeaseLostError,
    UnknownJobError,
    check_kind,
    check_lane,
    job_brief,
    lane_conflict_message,
    lane_for,
    lost_lease_message,
    status_counts,
)

logger = logging.getLogger(__name__)

# Every script gets the key base as ARGV[1]; these name the keys exactly as the Python methods below do.
_PRELUDE = """
local P = ARGV[1]
local RUNNING, COUNTS = P .. ':running', P .. ':counts'
local function job_key(id) return P .. ':job:' .. id end
local function queue_key(lane) return P .. ':queue:' .. lane end
local function queued_key(project) return P .. ':queued:' .. project end
local function lock_key(lane, project) return P .. ':lock:' .. lane .. ':' .. project end
local function project_jobs(project) return P .. ':project:' .. project end

-- A running job's outcome: 'done' keeps `outcome` as its result JSON, 'failed' as its error. Releases
-- the (project, lane) lock and sets the hash to expire `keep_s` seconds from now.
local function close(id, status, outcome, now, keep_s)
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'project_id', 'lane', 'token')
  local project, lane, token = f[1], f[2], f[3]
  if token and redis.call('GET', lock_key(lane, project)) == id .. ':' .. token then
    redis.call('DEL', lock_key(lane, project))
  end
  redis.call('HSET', jk, 'status', status, 'finished_at', now)
  if status == 'done' then
    redis.call('HSET', jk, 'result', outcome)
    redis.call('HDEL', jk, 'lease_until', 'error')
  else
    redis.call('HSET', jk, 'error', outcome)
    redis.call('HDEL', jk, 'lease_until', 'result')
  end
  redis.call('ZREM', RUNNING, id)
  redis.call('HINCRBY', COUNTS, lane .. ':running', -1)
  redis.call('HINCRBY', COUNTS, lane .. ':' .. status, 1)
  redis.call('SET', P .. ':last_finished', id)
  if status == 'failed' then redis.call('SET', P .. ':last_error', id) end
  redis.call('EXPIRE', jk, keep_s)
  redis.call('EXPIRE', project_jobs(project), keep_s)
end
"""

# ARGV: base, project, kind, lane, '1' when the caller named the lane else '', payload JSON,
#   max_attempts, now, keep_s -> {'ok', id} | {'lane', id, the queued job's lane}
_ENQUEUE = """
local project, kind, lane = ARGV[2], ARGV[3], ARGV[4]
local id = redis.call('HGET', queued_key(project), kind)
if id and redis.call('EXISTS', job_key(id)) == 1 then
  local queued_lane = redis.call('HGET', job_key(id), 'lane')
  if ARGV[5] ~= '' and queued_lane ~= lane then return {'lane', id, queued_lane} end
  redis.call('HSET', job_key(id), 'payload', ARGV[6])
  return {'ok', id}
end
id = tostring(redis.call('INCR', P .. ':seq'))
redis.call('HSET', job_key(id), 'project_id', project, 'kind', kind, 'lane', lane, 'payload', ARGV[6],
           'status', 'queued', 'attempts', 0, 'max_attempts', ARGV[7], 'created_at', ARGV[8])
redis.call('HSET', queued_key(project), kind, id)
redis.call('RPUSH', queue_key(lane), id)
redis.call('ZADD', project_jobs(project), id, id)
redis.call('EXPIRE', project_jobs(project), ARGV[9])
return {'ok', id}
"""

# ARGV: base, lane, worker_id, token, now, lease_s, lease_until -> {id, hash as a flat list} | false
_CLAIM = """
local lane, token, now, lease_until = ARGV[2], ARGV[4], ARGV[5], ARGV[7]
local queue = queue_key(lane)
for _, id in ipairs(redis.call('LRANGE', queue, 0, -1)) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'project_id', 'kind')
  local project, kind = f[1], f[2]
  if not project then
    redis.call('LREM', queue, 0, id)  -- its hash was deleted by hand: drop the dangling id
  elseif redis.call('EXISTS', lock_key(lane, project)) == 0 then
    redis.call('LREM', queue, 1, id)
    if redis.call('HGET', queued_key(project), kind) == id then redis.call('HDEL', queued_key(project), kind) end
    redis.call('SET', lock_key(lane, project), id .. ':' .. token)
    redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'status', 'running', 'worker_id', ARGV[3], 'token', token, 'lease_s', ARGV[6],
               'lease_until', lease_until, 'started_at', now, 'heartbeat_at', now)
    redis.call('ZADD', RUNNING, lease_until, id)
    redis.call('HINCRBY', COUNTS, lane .. ':running', 1)
    return {id, redis.call('HGETALL', jk)}
  end
end
return false
"""

# ARGV: base, id, token ('' = any claim), now -> 1 when the lease was extended, else 0
_HEARTBEAT = """
local jk = job_key(ARGV[2])
local f = redis.call('HMGET', jk, 'status', 'token', 'lease_s')
if f[1] ~= 'running' or (ARGV[3] ~= '' and f[2] ~= ARGV[3]) then return 0 end
local lease_until = string.format('%.6f', tonumber(ARGV[4]) + tonumber(f[3]))
redis.call('HSET', jk, 'lease_until', lease_until, 'heartbeat_at', ARGV[4])
redis.call('ZADD', RUNNING, 'XX', lease_until, ARGV[2])
return 1
"""

# ARGV: base, id, token ('' = any claim), 'done'|'failed', outcome, now, keep_s
#   -> {'ok'} | {'unknown'} | {'lost', status, attempts}
_FINISH = """
local id, token = ARGV[2], ARGV[3]
local f = redis.call('HMGET', job_key(id), 'status', 'token', 'attempts')
if not f[1] then return {'unknown'} end
if f[1] ~= 'running' or (token ~= '' and f[2] ~= token) then return {'lost', f[1], f[3]} end
close(id, ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return {'ok'}
"""

# ARGV: base, now, keep_s -> {requeued ids, failed ids}
_REQUEUE_STALE = """
local now, requeued, failed = ARGV[2], {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', RUNNING, '-inf', '(' .. now)) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'project_id', 'kind', 'lane', 'attempts', 'max_attempts', 'token')
  local project, kind, lane, token = f[1], f[2], f[3], f[6]
  if not project then
    redis.call('ZREM', RUNNING, id)
  else
    local attempts, limit = tonumber(f[4]), tonumber(f[5])
    local other = redis.call('HGET', queued_key(project), kind)
    if other or attempts >= limit then
      local why = 'worker lost (lease expired) on attempt ' .. attempts .. ' of ' .. limit
      if other then why = 'worker lost (lease expired); superseded by queued job ' .. other end
      close(id, 'failed', why, now, ARGV[3])
      redis.call('HDEL', jk, 'token')
      table.insert(failed, id)
    else
      if token and redis.call('GET', lock_key(lane, project)) == id .. ':' .. token then
        redis.call('DEL', lock_key(lane, project))
      end
      redis.call('HSET', jk, 'status', 'queued')
      redis.call('HDEL', jk, 'worker_id', 'token', 'lease_until')
      redis.call('ZREM', RUNNING, id)
      redis.call('HINCRBY', COUNTS, lane .. ':running', -1)
      redis.call('HSET', queued_key(project), kind, id)
      redis.call('LPUSH', queue_key(lane), id)  -- the front: it waited longest
      table.insert(requeued, id)
    end
  end
end
return {requeued, failed}
"""


def _text(value) -> str | None:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


class RedisJobQueue:
    """The job queue on Redis (see the module docstring). ``connection`` is a ``redis.Redis``;
    ``max_attempts`` is how often a job whose worker died is claimed before it fails; ``keep_s`` how long
    a finished job stays readable; ``prefix`` starts every key."""

    def __init__(
        self, *, connection, prefix: str = "osprey", max_attempts: int = 3, keep_s: int = 30 * 86400
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if keep_s < 1:
            raise ValueError(f"keep_s must be >= 1 second (finished jobs expire after it), got {keep_s}")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(
                f"prefix must be a non-empty key prefix without spaces such as 'osprey', got {prefix!r}"
            )
        self.redis = connection
        self.max_attempts = int(max_attempts)
        self.keep_s = int(keep_s)
        self.prefix = prefix
        self._base = f"{prefix}:jobs"
        # registering sends nothing: each call runs EVALSHA and loads the script when the server lacks it
        self._enqueue, self._claim, self._heartbeat, self._finish_script, self._requeue = (
            connection.register_script(_PRELUDE + body)
            for body in (_ENQUEUE, _CLAIM, _HEARTBEAT, _FINISH, _REQUEUE_STALE)
        )

    @classmethod
    def from_url(cls, url: str, **kwargs) -> RedisJobQueue:
        """The queue on the Redis at ``url`` (``redis://host:6379/0``); ``kwargs`` as for the class."""
        import redis

        return cls(connection=redis.Redis.from_url(url), **kwargs)

    def enqueue(
        self, project_id: str, kind: str, payload: dict | None = None, *, lane: str | None = None
    ) -> str:
        """Queue a job in ``lane`` (default ``lane_for(kind)``); returns its id. While a job of this project
        and kind is queued, that job is returned instead, with its payload replaced by this one (the
        newest request wins); ValueError when ``lane`` is named and that job waits in another lane."""
        project, payload_json = project_key(project_id), dumps(payload or {})
        check_kind(kind)
        named = lane is not None
        lane = check_lane(lane) if named else lane_for(kind)
        args = [self._base, project, kind, lane, "1" if named else "", payload_json, self.max_attempts,
                time.time(), self.keep_s]  # fmt: skip
        reply = [_text(v) for v in self._enqueue(args=args)]
        if reply[0] == "lane":
            raise ValueError(lane_conflict_message(reply[1], kind, reply[2], lane))
        return reply[1]

    def claim(self, worker_id: str, lease_s: float, *, lane: str) -> Job | None:
        """Atomically take the oldest queued job of ``lane`` whose project has no running job in that lane,
        or None. The job becomes ``running`` for ``worker_id`` until ``now + lease_s``."""
        check_lane(lane)
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
        now, token = time.time(), uuid.uuid4().hex
        args = [self._base, lane, worker_id, token, now, float(lease_s), now + lease_s]
        reply = self._claim(args=args)
        if not reply:
            return None
        flat = [_text(v) for v in reply[1]]
        return self._to_job(_text(reply[0]), dict(zip(flat[::2], flat[1::2], strict=True)))

    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool:
        """Extend a running job's lease by its ``lease_s``; False when the job is no longer held."""
        return self._heartbeat(args=[self._base, str(job_id), token or "", time.time()]) == 1

    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None:
        """Mark a running job done with its ``result`` (a JSON object). Raises LeaseLostError when the
        job is not running (or, with ``token``, no longer held by that claim): nothing is marked."""
        self._finish(job_id, "done", dumps(result or {}), token=token)

    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None:
        """Mark a running job failed, keeping ``error``; LeaseLostError as for ``complete``."""
        self._finish(job_id, "failed", str(error)[:4000], token=token)

    def _finish(self, job_id, status: str, outcome: str, *, token: str | None) -> None:
        args = [self._base, str(job_id), token or "", status, outcome, time.time(), self.keep_s]
        reply = [_text(v) for v in self._finish_script(args=args)]
        if reply[0] == "unknown":
            raise UnknownJobError(f"no job has id {job_id}; list them with jobs(project_id)")
        if reply[0] == "lost":
            raise LeaseLostError(lost_lease_message(str(job_id), reply[1], int(reply[2] or 0)))

    def requeue_stale(self, *, now: float | None = None) -> dict:
        """Running jobs whose lease expired (their worker died): back to the front of their lane's queue,
        or ``failed`` once ``max_attempts`` claims were spent. A stale job whose project and kind already
        has a queued job is failed as superseded by it. Returns ``{"requeued": [ids], "failed": [ids]}``."""
        now = time.time() if now is None else now
        requeued, failed = self._requeue(args=[self._base, now, self.keep_s])
        out = {"requeued": [_text(i) for i in requeued], "failed": [_text(i) for i in failed]}
        if out["requeued"] or out["failed"]:
            logger.warning("stale jobs: requeued %s, failed %s", out["requeued"], out["failed"])
        return out

    def job(self, job_id: str) -> Job:
        """One job by id; UnknownJobError when there is none (finished jobs expire after ``keep_s``)."""
        fields = self._fields(self.redis.hgetall(f"{self._base}:job:{job_id}"))
        if not fields:
            raise UnknownJobError(f"no job has id {job_id}; list them with jobs(project_id)")
        return self._to_job(str(job_id), fields)

    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]:
        """The project's jobs, newest first."""
        key = f"{self._base}:project:{project_key(project_id)}"
        out: list[Job] = []
        below = "+inf"
        while len(out) < limit:
            # page by score (the id), so jobs enqueued meanwhile do not shift the pages
            ids = [_text(i) for i in self.redis.zrevrangebyscore(key, below, "-inf", start=0, num=limit)]
            if not ids:
                break
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(f"{self._base}:job:{job_id}")
                hashes = pipe.execute()
            expired = [job_id for job_id, fields in zip(ids, hashes, strict=True) if not fields]
            if expired:  # finished jobs past keep_s: forget their ids too
                self.redis.zrem(key, *expired)
            out += [self._to_job(i, self._fields(h)) for i, h in zip(ids, hashes, strict=True) if h]
            below = f"({ids[-1]}"
        return out[:limit]

    def active(self, project_id: str, *, lane: str) -> list[Job]:
        """Every queued or running job of the project in ``lane``, oldest first (however many): the
        lane's queue and the project's lock in that lane, read in one round trip."""
        project, base = project_key(project_id), self._base
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(f"{base}:queue:{check_lane(lane)}", 0, -1)
            pipe.get(f"{base}:lock:{lane}:{project}")
            queued, lock = pipe.execute()
        ids = [_text(i) for i in queued]
        if lock:
            ids.append(_text(lock).partition(":")[0])
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(f"{base}:job:{job_id}", "project_id", "status")
            owners = pipe.execute()
        mine = sorted(
            {i for i, (owner, status) in zip(ids, owners, strict=True)
             if _text(owner) == project and _text(status) in ("queued", "running")},
            key=int,
        )  # fmt: skip
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in mine:
                pipe.hgetall(f"{base}:job:{job_id}")
            hashes = pipe.execute()
        return [self._to_job(i, self._fields(h)) for i, h in zip(mine, hashes, strict=True) if h]

    def status(self) -> dict:
        """Job counts per state in all and per lane (``"lanes": {lane: {state: n}}``), the last error and
        the last finished job (for /health and /metrics). ``done`` and ``failed`` count every job finished
        on this Redis, including those expired since."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(f"{self._base}:counts")
            for lane in LANES:
                pipe.llen(f"{self._base}:queue:{lane}")
            pipe.get(f"{self._base}:last_error")
            pipe.get(f"{self._base}:last_finished")
            counts, *queued, last_error, last_finished = pipe.execute()
        rows = [(*_text(k).split(":", 1), int(v)) for k, v in counts.items()]
        rows += [(lane, "queued", n) for lane, n in zip(LANES, queued, strict=True)]
        briefs = {}
        for name, job_id in (("last_error", last_error), ("last_finished", last_finished)):
            try:
                briefs[name] = job_brief(self.job(_text(job_id))) if job_id else None
            except UnknownJobError:  # expired after keep_s
                briefs[name] = None
        return {"backend": "redis", **status_counts(rows), **briefs}

    @staticmethod
    def _fields(raw: dict) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in raw.items()}

    def _to_job(self, job_id: str, h: dict[str, str]) -> Job:
        def seconds(name: str) -> float | None:
            return float(h[name]) if h.get(name) is not None else None

        return Job(
            job_id=job_id,
            project_id=h["project_id"],
            kind=h["kind"],
            lane=h["lane"],
            payload=json.loads(h.get("payload") or "{}"),
            status=h["status"],
            attempts=int(h.get("attempts", 0)),
            max_attempts=int(h.get("max_attempts", self.max_attempts)),
            created_at=float(h["created_at"]),
            worker_id=h.get("worker_id"),
            token=h.get("token"),
            lease_until=seconds("lease_until"),
            started_at=seconds("started_at"),
            finished_at=seconds("finished_at"),
            result=json.loads(h["result"]) if h.get("result") else None,
            error=h.get("error"),
        )
