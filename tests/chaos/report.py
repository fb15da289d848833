"""RELIABILITY.md, rendered from the chaos run's JSON (``tests/chaos/results.json``) and the
list of bad-input cases with the tests that hold them."""

from __future__ import annotations

from typing import Any

#: The bad-input campaign: (case, test id). Every id is collected by pytest (checked in test_chaos.py).
CAMPAIGN: list[tuple[str, str]] = [
    *[(f"malformed taskmesh header: {case}", "tests/test_bad_messages.py::"
       "test_bad_requirement_headers_are_refused_one_line_each_and_the_worker_lives")
      for case in ("a string", "a list", "unknown profile 'tpu'", "vram_mib -5", "vram_mib 'lots'",
                   "min_compute_capability 'abc'", "gpus 0", "gpus True", "vram on a cpu profile",
                   "a datetime value", "a Decimal value", "a bytes value", "a UUID value", "cpu_cores NaN")],
    *[(f"raw item on a queue list: {case}", "tests/test_bad_messages.py::"
       "test_raw_malformed_messages_on_the_list_never_stop_the_worker")
      for case in ("not JSON", "a JSON list", "headers a string", "properties a string", "body not base64",
                   "body not Celery's [args, kwargs, embed]", "body not JSON", "no task id",
                   "taskmesh header a string")],
    ("a task name no worker has", "tests/test_bad_input.py::"
     "test_a_message_naming_a_task_nobody_has_fails_its_caller_naming_the_task"),
    ("a 16 MiB argument", "tests/test_bad_input.py::test_an_oversized_argument_runs_and_holds_up_no_neighbour"),
    *[(f"an argument JSON cannot carry: {case}", f"tests/test_bad_input.py::test_an_argument_json_cannot_carry_is_"
       f"refused_at_send_and_nothing_is_queued[{case}]") for case in ("object", "set", "function")],
    *[(f"arguments that do not fit the task: {case}", f"tests/test_bad_input.py::test_arguments_that_do_not_fit_"
       f"the_task_fail_that_task_only[{case}]") for case in ("unknown-kwarg", "missing-arg")],
    *[(f"garbled Celery header: {case}", f"tests/test_bad_input.py::test_a_message_with_a_garbled_celery_header_"
       f"is_refused_and_dead_lettered[{case}]") for case in ("eta", "expires", "timelimit", "retries")],
    *[(f"bad environment value: {case}", f"tests/test_bad_input.py::test_a_bad_environment_value_is_one_line_"
       f"naming_it_and_the_command_exits[{case}]")
      for case in ("gpu-slots", "simulate-gpus", "cpu-concurrency", "on-infeasible", "visibility-timeout",
                   "max-depth", "hardware-file", "broker-scheme-typo", "broker-port-typo")],
    *[(f"bad worker command line: {case}", f"tests/test_bad_input.py::test_a_bad_worker_command_line_names_the_"
       f"fix_and_exits_2[{case}]") for case in ("unknown-profile", "gpu-on-gevent", "gpu-without-gpus")],
    *[(f"task declared with bad requirements: {case}", f"tests/test_bad_input.py::test_a_task_declared_with_bad_"
       f"requirements_is_one_line_naming_the_task_at_import[{case}]")
      for case in ("unknown-profile", "unreadable-vram", "vram-on-cpu")],
    ("wrong -A module, a module raising at import, a missing dependency, TASKMESH_DEFAULT_PROFILE typo",
     "tests/test_first_hour.py::test_a_wrong_or_broken_app_module_is_one_line_naming_the_fix_and_exit_2"),
    ("malformed YAML config", "tests/test_config.py::test_malformed_yaml_names_the_file_and_line"),
    ("unknown config key", "tests/test_config.py::test_an_unknown_key_names_the_closest_valid_one"),
    ("bad config values (6 cases)", "tests/test_config.py::test_bad_values_name_the_key_and_the_fix"),
    ("garbled TASKMESH_SIMULATE_GPUS (7 cases)", "tests/test_config.py::test_a_garbled_simulated_gpu_spec_is_refused"),
    ("dangerous timings in the file (5 cases)", "tests/test_config.py::"
     "test_dangerous_timings_are_refused_naming_the_key_and_a_safe_value"),
    ("dangerous timings in the environment (2 cases)", "tests/test_config.py::"
     "test_dangerous_timings_from_the_environment_are_refused_too"),
    ("an override for a task the app does not have", "tests/test_config.py::"
     "test_an_override_for_a_task_the_app_does_not_have_is_named_with_the_closest_task"),
    ("any size text (hypothesis)", "tests/test_properties.py::test_any_text_is_a_positive_size_or_a_size_error"),
    ("any requirement header (hypothesis)", "tests/test_properties.py::"
     "test_any_header_is_a_requirement_or_a_requirement_error"),
    ("any config value under known keys (hypothesis)", "tests/test_properties.py::"
     "test_any_value_under_known_keys_loads_or_is_a_config_error"),
]

SCENARIOS = {
    "kills": ("(a) random SIGKILLs", "tasks over gpu, cpu_intensive, io and mixed (half `once=True`), each kill a "
              "worker process or a pool child running a task"),
    "redis_restarts": ("(b) Redis restarted", "Redis SIGKILLed and started again on its append-only file while a "
                       "producer sends"),
    "connection_drops": ("(c) CLIENT KILL while held", "10 GiB tasks held (20 GiB of the GPU taken), the worker's "
                         "connections killed"),
    "stalls_above": ("(d) SIGSTOP, dead_after_s above the stall", "worker running a 20 s GPU task stopped past its "
                     "reservation TTL (6 s)"),
    "stalls_below": ("(d) SIGSTOP, dead_after_s below the stall", "the same stall, presumed dead meanwhile"),
    "long_task": ("(e) longer than the visibility timeout", "a running task's delivery backdated past kombu's "
                  "default 3,600 s, one also past taskmesh's; then kombu's expiry scan (`QoS.restore_visible`) runs"),
    "poison": ("(f) poison tasks", "tasks that SIGKILL their own process, tasks that always raise, among "
               "ordinary ones"),
}


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _row(name: str, result: dict[str, Any]) -> str:
    title, _ = SCENARIOS[name]
    f = result["figures"]
    if result["status"] != "ok":
        return f"| {title} | failed: {f.get('error', '?')[:120]} | | | | | |"
    if name == "poison":
        return (f"| {title} | {f['poison_tasks']} poison + {f['neighbours']['sent']} | {f['neighbours']['lost']} | "
                f"{f['neighbours']['duplicates']} | - | runs per killer {f['runs_per_killer']}, per raiser "
                f"{f['runs_per_raiser']}; dead letters listed {f['dead_lettered_listed']}, metric "
                f"{f['dead_lettered_metric']} | {f['ledger_reserved_mib']} |")
    if name.startswith("stalls"):
        return (f"| {title} | {f['rounds']} stalls of {f['stall_s']} s, dead_after_s {f['dead_after_s']} | "
                f"{f['lost']} | {f['duplicates']} | - | duplicates_detected {f['duplicates_detected']}; ledger "
                f"written back {f['ledger_after_stall_ok']}/{f['rounds']} | {f.get('ledger_reserved_mib')} |")
    if name == "long_task":
        return (f"| {title} | 1 (+1 control) | {f['lost']} | {f['duplicates']} | - | visibility timeout "
                f"{f['visibility_timeout_s']} s; control backdated past it ran again: "
                f"{f['control_past_timeout_duplicates']} | {f['ledger_reserved_mib']} |")
    extra = {
        "kills": f"{f.get('kills')} kills ({f.get('kills_of_workers')} of workers), {f.get('tasks_hit')} tasks hit, "
                 f"re-runs {f.get('reruns')}, recovery at most {_cell(f.get('recovery_max_s'))} s"
                 + (f"; lost: {', '.join(f['lost_tasks'])}" if f.get("lost_tasks") else "")
                 + (f"; left in kombu's unacked hash: {f['unacked_left']}" if "unacked_left" in f else ""),
        "redis_restarts": f"{f.get('restarts')} restarts, down {f.get('down_s')} s each; sends refused "
                          f"{f.get('send_refused')} (kombu OperationalError), slowest send {f.get('slowest_send_s')} s;"
                          " "
                          f"left in kombu's unacked hash: {f.get('unacked_left')}, lost after they started: "
                          f"{f.get('lost_after_they_started')}",
        "connection_drops": f"{f.get('drops')} drops, at most {f.get('most_held')} held at once",
    }[name]
    once = f["duplicates_once"]
    if f.get("duplicates_once_unmarked"):
        once = f"{once} ({f['duplicates_once_unmarked']} killed before its mark)"
    return (f"| {title} | {f['sent']} | {f['lost']} | {f['duplicates']} | {once} | {extra} | "
            f"{f['ledger_reserved_mib']} |")


def render(results: dict[str, Any]) -> str:
    machine = results["machine"]
    size = results["size"]
    lines = [
        "# Reliability: faults injected, and what was lost",
        "",
        "Rendered by `scripts/chaos` from `tests/chaos/results.json`; do not edit by hand. Every figure comes",
        "from real parts: a `redis-server` on loopback, `taskmesh worker` / `celery worker` processes with",
        "simulated GPUs, faults injected by process id (SIGKILL, SIGSTOP/SIGCONT, a Redis SIGKILL and",
        "restart on its append-only file, `CLIENT KILL`). Runs are counted by a side channel the tasks",
        "write (a start and an end record per run, in Redis), so a lost or doubled run shows.",
        "",
        f"- command: `{results['command']}` (size **{size}**"
        + ("; full size did not fit this session, see the note below" if size != "full" else "") + ")",
        f"- machine: {results['machine_line']}",
        f"- date: {machine['date']}, commit {machine['commit']}",
        "- the CPUs were shared with other work while it ran (load average before is in the machine line):",
        "  recovery times are upper bounds for this machine, not speeds",
        "",
        "*Lost*: sent (its send returned) and never ran to its end. *Duplicates*: a further run to the end",
        "of a task that had already run to its end. *Re-runs* (kills): a run started again after one that",
        "was killed before its end, which is at-least-once working. *Recovery*: from the kill until every",
        "task it hit had run to its end again. *Ledger*: MiB the GPU ledger still reserved at the end of",
        "the scenario, when nothing ran (the GPU tasks running then declared 0).",
        "",
        "| scenario | tasks | lost | duplicates | duplicates once=True | fault and figures | ledger MiB at end |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, result) for name, result in results["scenarios"].items()]
    kills = results["scenarios"].get("kills", {})
    if kills.get("status") == "ok" and kills["figures"]["lost"]:
        f = kills["figures"]
        stranded, vanished = f.get("unacked_left", 0), f["lost"] - f.get("unacked_left", 0)
        lines += ["", f"**Not at-least-once under SIGKILL: {f['lost']} task(s) never ran in (a)** "
                  f"({', '.join(f.get('lost_tasks', []))}; none had started)."]
        if stranded:
            lines += [f"{stranded} stayed in kombu's `unacked` hash: neither dead-worker recovery nor the",
                      "orphan sweep gave it back within the run: a bug, and the CI test asserts it does not",
                      "happen (`unacked_left == 0`)."]
        if vanished:
            lines += [f"{vanished} left no trace at all (no result, not in `unacked`, in no queue). kombu's own",
                      "fetch lost messages this way (`BRPOP`, then the `unacked` record in a second round trip),",
                      "which taskmesh's fetch closes (`worker/fetch.py`): a loss now is a bug to find."]
            if f.get("lost_once_claims"):
                lines += [f"The run-once claims of the lost `once=True` tasks: {', '.join(f['lost_once_claims'])} "
                          "(`none`: never claimed, or claimed by a worker that then died and whose claim "
                          "expired; `returned`/`done` would mean it was skipped unrun)."]
    if kills.get("status") == "ok" and kills["figures"].get("duplicates_once_unmarked"):
        lines += ["", f"**{kills['figures']['duplicates_once_unmarked']} `once=True` run(s) ran again in (a)**, each "
                  "after its process was SIGKILLed within a second of the body's last effect (its end record),",
                  "before the run was marked done: the one window the README's guarantee leaves open (the mark is",
                  "one Redis round trip after the body returns; on a busy gevent worker it waits its turn). Any",
                  "other duplicate of a `once=True` task would be a bug, and the CI test asserts there is none."]
    lines += ["", "## The scenarios", ""]
    for name, result in results["scenarios"].items():
        title, what = SCENARIOS[name]
        ran = f"; `{result['command']}` at {result['date']}, commit {result['commit']}" if "commit" in result else ""
        lines.append(f"- **{title}**: {what}. Parameters `{result['params']}`, {result['seconds']} s{ran}.")
    lines += [
        "",
        "Settings that make the runs fit: workers run with `TASKMESH_RESERVATION_TTL_S=6` and",
        "`TASKMESH_DEAD_AFTER_S=8` (defaults 15 and 60) so a killed worker's messages come back in",
        "seconds; the chaos tasks retry a lost worker after 1 s (`default_retry_delay=1`, Celery's is",
        "180 s). (e) cannot wait an hour: it backdates the delivery in kombu's `unacked_index` (the",
        "time kombu's own expiry scan reads) and runs that scan, with the timeout the app derived.",
        "(d) reuses `tests/test_fencing.py`'s stall (a 20 s task, stalls of 10 s and 14 s).",
        "",
        "CI runs (a), (b), (c), (e) and (f) at reduced size (`tests/chaos/test_chaos.py`); (d) runs in CI",
        "as single cases in `tests/test_fencing.py`. Found by the kill scenario and fixed: a worker",
        "SIGKILLed within a second of taking a message left it to the visibility timeout (an hour),",
        "because it announced what it holds up to a second late",
        "(`test_a_worker_killed_within_a_second_of_taking_a_message_hands_it_back`); a `once=True`",
        "task ran twice when its worker was SIGKILLed after the body returned and before the ack",
        "(`tests/test_once.py::test_a_run_whose_body_returned_is_not_run_again_when_its_worker_dies_before_the_ack`);",
        "tasks vanished (about one per full-size run, all on the gevent worker) because kombu's `BRPOP` takes a",
        "message off its list and records it as unacknowledged in a second round trip, so a worker killed",
        "between the two took it with it (proven by `tests/test_fetch_loss.py`); workers now fetch with one",
        "Lua step that pops and records together (`worker/fetch.py`), and the CI test asserts nothing is lost;",
        "an `io_once` task never ran, left in kombu's `unacked` hash by a worker killed between kombu",
        "recording the delivery and the worker announcing it: orphaned messages are now swept",
        "(`state/orphans.py`, `test_a_message_taken_by_a_process_killed_before_it_said_so_is_delivered_again`).",
        "Seen in (b): as Redis goes, kombu's channel close can end a Celery worker",
        "(`Unrecoverable error: AttributeError ... 'hostname'` in `restore_unacked`, plain kombu 5.7);",
        "`taskmesh worker` restarts it, and the task it ran comes back only after `dead_after_s` (60 s by",
        "default): not lost, late. A task that ends while its worker's connection is down keeps its",
        "message in kombu's `unacked` hash (the acknowledgement is lost with the old channel); the",
        "orphan sweep delivers it again after `dead_after_s`, a duplicate (`once=True` skips it).",
        "*left unacknowledged* counts what is still there at the end.",
        "(The tasks' run records retry while Redis is down, so the side channel is not what fails.)",
        "",
        f"## Bad input: {len(CAMPAIGN)} cases",
        "",
        "Each: one line naming the thing and the fix (no traceback), the worker alive, neighbours'",
        "tasks run, nothing queued lost. Parametrised cases are listed one per line.",
        "",
        "| # | case | test |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {case} | `{test}` |" for n, (case, test) in enumerate(CAMPAIGN, 1)]
    lines += ["", "Reproduce: `scripts/chaos` (full size, several minutes), `scripts/chaos --size medium`,",
              "`scripts/chaos --render-only` to write this file again from the JSON.", ""]
    return "\n".join(lines)
