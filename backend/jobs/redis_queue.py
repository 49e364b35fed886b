"""The job queue on Redis + RQ (when ``REDIS_URL`` is set): jobs are RQ jobs (``rq.Job`` hashes in the RQ
queue ``osprey-train``, finished and failed ones in RQ's registries, so ``rq info`` shows them) on a Redis
that persists them across restarts.

Claims are atomic (``WATCH``/``MULTI``) and a per-project Redis lock (``osprey:osprey-train:lock:<project>``,
held from claim to complete/fail/requeue) keeps one running job per project. The jobs are run by
:class:`backend.jobs.worker.Worker` threads inside the service processes, not by ``rq worker``.
Semantics as in :mod:`backend.jobs.base`.
"""

from __future__ import annotations

import logging
import time
import uuid

from backend.labelstudio.ids import project_key

from .base import Job, LeaseLostError, UnknownJobError, job_brief

logger = logging.getLogger(__name__)


def run_rq_job(project_id: str, kind: str, payload: dict) -> None:
    """The function RQ records for our jobs. They are run by ``Worker`` threads in the service, which
    claim them with a per-project lock; an ``rq worker`` must not consume the ``osprey-train`` queue."""
    raise RuntimeError(
        "osprey-label training jobs run in the service's own worker threads; stop the `rq worker` that "
        "consumes the 'osprey-train' queue"
    )


class RedisJobQueue:
    """The job queue on Redis + RQ (see the module docstring). ``connection`` is a ``redis.Redis``."""

    def __init__(
        self, *, connection, queue_name: str = "osprey-train", max_attempts: int = 3, keep_s: int = 30 * 86400
    ) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.redis = connection
        self.max_attempts = max_attempts
        self.keep_s = keep_s
        self.queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
        self._serializer = JSONSerializer
        self._prefix = f"osprey:{queue_name}"
        self._running = f"{self._prefix}:running"  # zset job id -> lease expiry

    @classmethod
    def from_url(cls, url: str, **kwargs) -> RedisJobQueue:
        import redis

        return cls(connection=redis.Redis.from_url(url), **kwargs)

    def _queued_key(self, project: str, kind: str) -> str:
        return f"{self._prefix}:queued:{project}:{kind}"

    def _lock_key(self, project: str) -> str:
        return f"{self._prefix}:lock:{project}"

    def _fetch(self, job_id: str):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job as RqJob

        try:
            return RqJob.fetch(str(job_id), connection=self.redis, serializer=self._serializer)
        except NoSuchJobError:
            return None

    def enqueue(self, project_id: str, kind: str, payload: dict | None = None) -> str:
        from redis.exceptions import WatchError
        from rq.job import Job as RqJob

        project, payload = project_key(project_id), dict(payload or {})
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string such as 'train', got {kind!r}")
        key = self._queued_key(project, kind)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    existing = pipe.get(key)
                    job = self._fetch(existing.decode()) if existing else None
                    pipe.multi()
                    if job is not None:
                        job.meta["payload"] = payload
                        job.save(pipeline=pipe)
                    else:
                        meta = {"project_id": project, "kind": kind, "payload": payload, "attempts": 0, "status": "queued",
                                "max_attempts": self.max_attempts}  # fmt: skip
                        job = RqJob.create(
                            run_rq_job, args=(project, kind, payload), connection=self.redis, meta=meta,
                            id=f"osprey-{uuid.uuid4().hex}", origin=self.queue.name, serializer=self._serializer,
                            result_ttl=self.keep_s, failure_ttl=self.keep_s, description=f"{kind} project {project}",
                        )  # fmt: skip
                        pipe.set(key, job.id)
                        pipe.zadd(f"{self._prefix}:jobs:{project}", {job.id: time.time()})
                        self.queue.enqueue_job(job, pipeline=pipe)
                    pipe.execute()
                    return job.id
                except WatchError:
                    continue

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        from redis.exceptions import WatchError
        from rq.job import JobStatus

        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0 seconds, got {lease_s}")
        for job_id in [i.decode() for i in self.redis.lrange(self.queue.key, 0, 99)]:
            job = self._fetch(job_id)
            if job is None:
                self.redis.lrem(self.queue.key, 1, job_id)
                continue
            project, kind = job.meta["project_id"], job.meta["kind"]
            lock, queued = self._lock_key(project), self._queued_key(project, kind)
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(self.queue.key, lock, queued, job.key)
                    if pipe.exists(lock) or job_id not in [
                        i.decode() for i in pipe.lrange(self.queue.key, 0, -1)
                    ]:
                        continue
                    job = self._fetch(job_id)
                    if job is None:
                        continue
                    now, token = time.time(), uuid.uuid4().hex
                    job.meta.update(status="running", attempts=job.meta.get("attempts", 0) + 1, worker_id=worker_id, token=token,
                                    lease_s=float(lease_s), lease_until=now + lease_s, started_at=now)  # fmt: skip
                    same_queued = pipe.get(queued)
                    pipe.multi()
                    pipe.lrem(self.queue.key, 1, job_id)
                    if same_queued is not None and same_queued.decode() == job_id:
                        pipe.delete(queued)
                    pipe.set(lock, f"{job_id}:{token}")  # released by complete/fail/requeue_stale
                    pipe.zadd(self._running, {job_id: now + lease_s})
                    job.set_status(JobStatus.STARTED, pipeline=pipe)
                    job.save(pipeline=pipe)
                    pipe.execute()
                except WatchError:
                    continue
            return self._to_job(job)
        return None

    def heartbeat(self, job_id: str, *, token: str | None = None) -> bool:
        job = self._fetch(job_id)
        if job is None or job.meta.get("lease_until") is None:
            return False
        if token is not None and job.meta.get("token") != token:
            return False
        lock = self._lock_key(job.meta["project_id"])
        if self.redis.get(lock) != f"{job_id}:{job.meta['token']}".encode():
            return False
        return (
            self.redis.zadd(self._running, {job_id: time.time() + job.meta["lease_s"]}, xx=True, ch=True) == 1
        )

    def complete(self, job_id: str, result: dict | None = None, *, token: str | None = None) -> None:
        self._finish(job_id, "done", result=result or {}, error=None, token=token)

    def fail(self, job_id: str, error: str, *, token: str | None = None) -> None:
        self._finish(job_id, "failed", result=None, error=str(error)[:4000], token=token)

    def _finish(self, job_id, status: str, *, result, error, token) -> None:
        from redis.exceptions import WatchError

        job = self._fetch(job_id)
        if job is None:
            raise UnknownJobError(f"no job has id {job_id}")
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(job.key, self._running, self._lock_key(job.meta["project_id"]))
                    job = self._fetch(job_id)
                    held = pipe.zscore(self._running, job_id) is not None
                    if not held or (token is not None and job.meta.get("token") != token):
                        raise LeaseLostError(
                            f"job {job_id} is not held by this claim (attempt {job.meta.get('attempts')}); its "
                            f"lease expired and it was requeued or finished elsewhere, so this outcome was not recorded"
                        )
                    pipe.multi()
                    self._close(pipe, job, status, result=result, error=error)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def _close(self, pipe, job, status: str, *, result, error) -> None:
        """Write a job's final state (in ``pipe``, inside MULTI) and release its project lock."""
        from rq.job import JobStatus
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        now = time.time()
        token = job.meta.get("token")
        job.meta.update(
            status=status, finished_at=now, lease_until=None, result=result, error=error, token=None
        )
        job.set_status(JobStatus.FINISHED if status == "done" else JobStatus.FAILED, pipeline=pipe)
        job.save(pipeline=pipe)
        pipe.zrem(self._running, job.id)
        lock = self._lock_key(job.meta["project_id"])
        if token is not None and self.redis.get(lock) == f"{job.id}:{token}".encode():  # caller WATCHes it
            pipe.delete(lock)
        registry = FinishedJobRegistry if status == "done" else FailedJobRegistry
        registry(queue=self.queue, serializer=self._serializer).add(
            job, self.keep_s, pipeline=pipe, **({} if status == "done" else {"exc_string": error or ""})
        )
        pipe.hincrby(f"{self._prefix}:stats", status, 1)
        pipe.set(f"{self._prefix}:last_finished", job.id)
        if status == "failed":
            pipe.set(f"{self._prefix}:last_error", job.id)

    def requeue_stale(self, *, now: float | None = None) -> dict:
        from redis.exceptions import WatchError
        from rq.job import JobStatus

        now = time.time() if now is None else now
        out: dict[str, list[str]] = {"requeued": [], "failed": []}
        for job_id in [i.decode() for i in self.redis.zrangebyscore(self._running, "-inf", now)]:
            while True:
                with self.redis.pipeline() as pipe:
                    try:
                        job = self._fetch(job_id)
                        if job is None:
                            self.redis.zrem(self._running, job_id)
                            break
                        queued = self._queued_key(job.meta["project_id"], job.meta["kind"])
                        lock = self._lock_key(job.meta["project_id"])
                        pipe.watch(job.key, self._running, queued, lock)
                        score = pipe.zscore(self._running, job_id)
                        if score is None or score >= now:
                            break
                        other = pipe.get(queued)
                        attempts, limit = (
                            job.meta.get("attempts", 0),
                            job.meta.get("max_attempts", self.max_attempts),
                        )
                        pipe.multi()
                        if attempts >= limit or other is not None:
                            why = (
                                f"worker lost (lease expired) on attempt {attempts} of {limit}"
                                if other is None
                                else f"worker lost (lease expired); superseded by queued job {other.decode()}"
                            )
                            self._close(pipe, job, "failed", result=None, error=why)
                            out["failed"].append(job_id)
                        else:
                            if self.redis.get(lock) == f"{job_id}:{job.meta.get('token')}".encode():
                                pipe.delete(lock)
                            job.meta.update(status="queued", lease_until=None, token=None, worker_id=None)
                            job.set_status(JobStatus.QUEUED, pipeline=pipe)
                            job.save(pipeline=pipe)
                            pipe.zrem(self._running, job_id)
                            pipe.set(queued, job_id)
                            pipe.lpush(self.queue.key, job_id)  # the front: it waited longest
                            out["requeued"].append(job_id)
                        pipe.execute()
                        break
                    except WatchError:
                        continue
        if out["requeued"] or out["failed"]:
            logger.warning("stale jobs: requeued %s, failed %s", out["requeued"], out["failed"])
        return out

    def job(self, job_id: str) -> Job:
        job = self._fetch(job_id)
        if job is None:
            raise UnknownJobError(f"no job has id {job_id}; list them with jobs(project_id)")
        return self._to_job(job)

    def jobs(self, project_id: str, *, limit: int = 50) -> list[Job]:
        ids = self.redis.zrevrange(f"{self._prefix}:jobs:{project_key(project_id)}", 0, limit - 1)
        found = [self._fetch(i.decode()) for i in ids]
        return [self._to_job(job) for job in found if job is not None]

    def status(self) -> dict:
        stats = {k.decode(): int(v) for k, v in self.redis.hgetall(f"{self._prefix}:stats").items()}
        briefs = {}
        for name in ("last_error", "last_finished"):
            job_id = self.redis.get(f"{self._prefix}:{name}")
            job = self._fetch(job_id.decode()) if job_id else None
            briefs[name] = job_brief(self._to_job(job)) if job is not None else None
        return {
            "backend": "redis",
            "queued": self.queue.count,
            "running": self.redis.zcard(self._running),
            "done": stats.get("done", 0),
            "failed": stats.get("failed", 0),
            **briefs,
        }

    def _to_job(self, job) -> Job:
        meta = job.meta
        status = meta.get("status") or {"started": "running"}.get(str(job.get_status()), "queued")
        return Job(
            job_id=job.id, project_id=meta["project_id"], kind=meta["kind"], payload=meta.get("payload", {}),
            status=status, attempts=meta.get("attempts", 0), max_attempts=meta.get("max_attempts", self.max_attempts),
            created_at=job.created_at.timestamp() if job.created_at else 0.0, worker_id=meta.get("worker_id"),
            token=meta.get("token"), lease_until=meta.get("lease_until"), started_at=meta.get("started_at"),
            finished_at=meta.get("finished_at"), result=meta.get("result"), error=meta.get("error"),
        )  # fmt: skip
