"""Several processes, one simulation: a checked wrapper around ``jax.distributed.initialize``.

Every process runs the same program. After :func:`initialize`, ``jax.devices()`` lists the devices
of all processes, and a computation over a mesh of them (the engine's ``clients`` axis) runs as one
program whose cross-device sums cross process boundaries (on CPU through gloo collectives, over
TCP). Process 0 hosts JAX's coordination service at ``coordinator`` (``HOST:PORT``); the others
connect to it.

What this module adds to ``jax.distributed.initialize``:

- every argument is checked first, and a bad one raises one ``ValueError`` naming it (process id
  out of range, ``num_processes < 1``, a malformed ``HOST:PORT``), instead of a C++ abort later;
- calling it twice, or after JAX has already run something, raises :class:`DistributedError`;
- the wait for the coordinator is bounded: a process other than 0 probes ``HOST:PORT`` for
  ``timeout`` seconds and raises :class:`CoordinatorUnreachable` naming the address and the
  timeout; process 0 checks that it can listen on the port (JAX itself crashes on a port in use);
- CPU collectives use gloo unless configured otherwise;
- ``peer_timeout`` is JAX's heartbeat timeout: a process that dies (killed, crashed, its machine
  gone) makes every other one terminate within ``peer_timeout`` seconds, and at once when the dead
  one is process 0 (the coordinator). JAX terminates them (``SIGABRT``, after printing
  ``Terminating process because the JAX distributed service detected fatal errors``); its Python
  callback for this is unusable in JAX 0.10.2, so a library user sees JAX's message, and
  ``fedjax-sim run`` runs the training in a child process and turns it into a named error
  (:func:`explain_failure`).

Limits: every process holds the whole population (the data are replicated, not split between
processes), and only process 0 should write files (:func:`is_main`).

Reference: JAX, "Multi-controller (multi-process) JAX",
https://docs.jax.dev/en/latest/multi_process.html.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Sequence
from typing import NamedTuple

DEFAULT_TIMEOUT = 120
"""Seconds :func:`initialize` waits for the coordinator and for all processes to connect."""
DEFAULT_PEER_TIMEOUT = 30
"""Seconds after which a process that stopped sending heartbeats is declared dead."""
DEFAULT_SHUTDOWN_TIMEOUT = 300
"""Seconds a finished process waits at exit for the others to finish (a dead one is still
noticed after ``peer_timeout``)."""

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.\-]+)):(?P<port>\d+)$")


class DistributedError(RuntimeError):
  """A multi-process run that cannot start or cannot go on; the message says why."""


class CoordinatorUnreachable(DistributedError):
  """The coordinator (process 0) did not answer within the timeout."""


class PeerLost(DistributedError):
  """Another process of the run died or stopped answering."""


class Address(NamedTuple):
  host: str
  port: int

  def __str__(self):
    return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(coordinator) -> Address:
  """``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as an :class:`Address`; ``ValueError`` naming the
  value otherwise."""
  match = _ADDRESS.match(coordinator) if isinstance(coordinator, str) else None
  if match is None:
    raise ValueError(f"coordinator must be HOST:PORT (e.g. 127.0.0.1:8476 or [::1]:8476), got "
                     f"{coordinator!r}")
  port = int(match["port"])
  if not 1 <= port <= 65535:
    raise ValueError(f"coordinator port must be in 1..65535, got {port} in {coordinator!r}")
  return Address(match["v6"] or match["host"], port)


def _positive_seconds(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
      or not math.isfinite(value):
    raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
  return max(1, math.ceil(value))


def check_arguments(coordinator, num_processes, process_id, *, local_devices=None,
                    cpu_devices=None, timeout=DEFAULT_TIMEOUT, peer_timeout=DEFAULT_PEER_TIMEOUT,
                    shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT) -> Address:
  """Checks :func:`initialize`'s arguments without touching JAX; returns the parsed address.

  Raises:
    ValueError: naming the first bad argument.
  """
  address = parse_address(coordinator)
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
  if isinstance(process_id, bool) or not isinstance(process_id, int) \
      or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be an integer in 0..{num_processes - 1} (num_processes="
                     f"{num_processes}), got {process_id!r}")
  if local_devices is not None:
    ids = list(local_devices) if isinstance(local_devices, Sequence) and \
        not isinstance(local_devices, str) else None
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids) \
        or len(set(ids)) != len(ids):
      raise ValueError(f"local_devices must be a non-empty sequence of distinct device ids >= 0, "
                       f"got {local_devices!r}")
  if cpu_devices is not None and (isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int)
                                  or cpu_devices < 1):
    raise ValueError(f"cpu_devices must be an integer >= 1, got {cpu_devices!r}")
  for name, value in (("timeout", timeout), ("peer_timeout", peer_timeout),
                      ("shutdown_timeout", shutdown_timeout)):
    _positive_seconds(name, value)
  return address


def _jax_state():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state


def is_initialized() -> bool:
  """Whether ``jax.distributed`` is initialized in this process."""
  return _jax_state().client is not None


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a JAX without the check: jax.distributed raises
    return False


def _wait_for_coordinator(address: Address, timeout: float) -> None:
  """Returns once ``address`` accepts a TCP connection; :class:`CoordinatorUnreachable` after
  ``timeout`` seconds."""
  deadline = time.monotonic() + timeout
  last = None
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((address.host, address.port), timeout=max(0.1, min(1.0, left))):
        return
    except OSError as e:  # refused (nothing listens yet), unreachable, unknown host, timed out
      last = e
    if time.monotonic() + 0.2 >= deadline:
      break
    time.sleep(0.2)
  raise CoordinatorUnreachable(
      f"the coordinator at {address} did not answer within {timeout:g} s ({last}); is process 0 "
      f"running with --coordinator {address}, and is that address reachable from this machine?")


def _check_port_free(address: Address) -> None:
  """Process 0 listens on ``[::]:PORT`` (JAX binds every address); a port in use crashes JAX's
  service, so it is checked here."""
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this machine
      continue
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((host, address.port))
        return
      except OSError as e:
        raise DistributedError(f"process 0 cannot listen on port {address.port} of the "
                               f"coordinator address {address}: {e.strerror or e}; choose a free "
                               "port") from None
  raise DistributedError("process 0 cannot open a socket to listen on")


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               local_devices: Sequence[int] | None = None, cpu_devices: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, peer_timeout: float = DEFAULT_PEER_TIMEOUT,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
  """Joins this process to a multi-process run (``jax.distributed.initialize``, checked).

  Call it first, before anything runs on a JAX device, with the same ``coordinator`` and
  ``num_processes`` on every process and a distinct ``process_id`` on each. Afterwards
  ``jax.devices()`` holds the devices of all ``num_processes`` processes, and
  ``simulate(..., devices=None)`` trains on all of them.

  Args:
    coordinator: ``HOST:PORT`` of process 0, reachable from every process (process 0 listens on
      ``PORT`` on all its addresses).
    num_processes: how many processes take part (>= 1).
    process_id: this process's index, in ``0..num_processes - 1``; process 0 is the coordinator
      and, by convention, the only one that writes files (:func:`is_main`).
    local_devices: ids of this process's accelerators to use (JAX's ``local_device_ids``; GPU);
      default all.
    cpu_devices: number of CPU devices of this process (``jax_num_cpu_devices``, as
      ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` does); default JAX's.
    timeout: seconds to wait for the coordinator to answer and for all processes to connect.
    peer_timeout: seconds without heartbeats after which a process is declared dead; every other
      process then terminates (at once when the dead one is process 0).
    shutdown_timeout: seconds a finished process waits at exit for the others.

  Raises:
    ValueError: a bad argument (named).
    DistributedError: already initialized, JAX already running, or process 0's port in use.
    CoordinatorUnreachable: (process_id > 0) nothing answered at ``coordinator`` within
      ``timeout`` seconds.
  """
  address = check_arguments(coordinator, num_processes, process_id, local_devices=local_devices,
                            cpu_devices=cpu_devices, timeout=timeout, peer_timeout=peer_timeout,
                            shutdown_timeout=shutdown_timeout)
  import jax
  if is_initialized():
    state = _jax_state()
    raise DistributedError(f"jax.distributed is already initialized in this process (process "
                           f"{state.process_id} of {state.num_processes}, coordinator "
                           f"{state.coordinator_address}); initialize once per process")
  if _backend_started():
    raise DistributedError("initialize must come before anything runs on a JAX device (a "
                           "computation, jax.devices(), jax.device_put, ...): JAX has already "
                           "started its backend in this process")
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  start = time.monotonic()
  if process_id == 0:
    _check_port_free(address)
  else:
    _wait_for_coordinator(address, timeout)
  left = max(1, math.ceil(timeout - (time.monotonic() - start)))
  jax.distributed.initialize(
      str(address), num_processes, process_id,
      local_device_ids=None if local_devices is None else list(local_devices),
      initialization_timeout=left, heartbeat_timeout_seconds=_positive_seconds("", peer_timeout),
      shutdown_timeout_seconds=_positive_seconds("", shutdown_timeout))


def shutdown() -> None:
  """Leaves the multi-process run (waits for the others to leave too); nothing if not in one."""
  import jax
  jax.distributed.shutdown()


def process_index() -> int:
  """This process's index (0 outside a multi-process run)."""
  import jax
  return jax.process_index()


def process_count() -> int:
  """How many processes take part (1 outside a multi-process run)."""
  import jax
  return jax.process_count()


def is_main() -> bool:
  """Whether this is process 0, the one that writes files (``True`` outside a multi-process run)."""
  return process_index() == 0


# What JAX prints (then aborts) when the coordination service reports a failure.
JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def explain_failure(log: str, coordinator: str, process_id: int, num_processes: int, *,
                    timeout: float = DEFAULT_TIMEOUT,
                    peer_timeout: float = DEFAULT_PEER_TIMEOUT) -> DistributedError | None:
  """The named error behind JAX's abort of a process, from the end of its stderr ``log``.

  JAX terminates a process of a multi-process run when another one died, when the coordinator
  went away, when not all processes connected in time, or when the shutdown barrier failed; this
  reads which from JAX's message. Returns ``None`` when ``log`` holds no such message.
  """
  at = log.rfind(JAX_FATAL)
  if at < 0:
    return None
  status = log[at:]
  where = f"this is process {process_id} of {num_processes}"
  dead = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+?)\s*\n",
                   status)
  ids = ", ".join(dead.group(1).replace(",", " ").split()) if dead else ", ".join(
      dict.fromkeys(re.findall(r"Task (\d+) heartbeat timeout", status)))
  if ids:
    return PeerLost(f"process {ids} stopped sending heartbeats for {peer_timeout:g} s (it died or "
                    f"its machine is unreachable), so this one stopped too ({where}, "
                    f"coordinator {coordinator})")
  if "RegisterTask" in status:
    return CoordinatorUnreachable(
        f"not all {num_processes} processes connected to the coordinator at {coordinator} within "
        f"{timeout:g} s ({where}); start every process with the same --coordinator and "
        f"--num-processes, and a distinct --process-id")
  if "Shutdown barrier" in status:
    return PeerLost(f"another process did not finish: the shutdown barrier timed out ({where}, "
                    f"coordinator {coordinator}); "
                    "see the other processes' output for the cause")
  if "coordination service" in status or "leader task" in status:
    return PeerLost(f"the coordinator (process 0 at {coordinator}) died or became unreachable, so "
                    f"this one stopped ({where}); see process 0's output for the cause")
  first = status.split("absl::Status:", 1)[-1].strip().splitlines()
  return PeerLost(f"JAX's distributed service stopped this process ({where}, coordinator "
                  f"{coordinator}): {first[0] if first else 'no reason given'}")


def explain_exception(error: BaseException, coordinator: str, process_id: int,
                      num_processes: int) -> PeerLost | None:
  """The named error behind an exception raised by a collective across processes, or ``None``.

  When a process dies in the middle of a cross-process collective, the others' collective usually
  fails at once (on CPU: ``Gloo ... failed: ... Connection reset by peer``) instead of waiting for
  the heartbeat timeout; this names that failure.
  """
  text = str(error)
  if not re.search(r"\bGloo\b|collective|Connection (reset|closed)|Broken pipe", text):
    return None
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return PeerLost(f"a collective across processes failed, most likely because another process "
                  f"died (this is process {process_id} of {num_processes}, coordinator "
                  f"{coordinator}): {first}")
