"""The parallel load's plan and scheduler: data first and biggest first, indexes after their table's
data, foreign keys after every index and never two on a common table, the rest in the dump's order."""

from __future__ import annotations

from pathlib import Path

from tests.unit.clients.test_sql_toc import entry, write
from vq_tasks.clients.sql_toc import read_toc
from vq_tasks.restore.postgres_parallel import _Scheduler
from vq_tasks.restore.postgres_plan import ORDERED, plan_load


def copy(table: str, rows: int) -> str:
    data = "".join(f"{n}\n" for n in range(rows))
    return entry("TABLE DATA", table, f"COPY public.{table} (id) FROM stdin;\n{data}\\.", data=True)


def constraint(table: str, name: str, definition: str, kind: str = "CONSTRAINT") -> str:
    return entry(
        kind, f"{table} {name}", f"ALTER TABLE ONLY public.{table}\n    ADD CONSTRAINT {name} {definition};"
    )


DUMP = [
    entry("TABLE", "a", "CREATE TABLE public.a (id integer, b_id integer);"),
    entry("TABLE", "b", "CREATE TABLE public.b (id integer, a_id integer);"),
    entry("TABLE", '"Big One"', 'CREATE TABLE public."Big One" (id integer);'),
    entry("TABLE ATTACH", "a_1", "ALTER TABLE ONLY public.a ATTACH PARTITION public.a_1 FOR VALUES IN (1);"),
    copy("a", 10),
    copy('"Big One"', 1000),
    copy("b", 20),
    entry("SEQUENCE SET", "s", "SELECT pg_catalog.setval('public.s', 3, true);"),
    constraint("a", "a_pkey", "PRIMARY KEY (id)"),
    entry("COMMENT", "CONSTRAINT a_pkey ON public.a", "COMMENT ON CONSTRAINT a_pkey ON public.a IS 'key';"),
    entry("INDEX", "big_id", 'CREATE INDEX big_id ON public."Big One" USING btree (id);'),
    entry("INDEX", "b_id", "CREATE UNIQUE INDEX b_id ON ONLY public.b USING btree (id);"),
    entry("INDEX ATTACH", "a_1_pkey", "ALTER INDEX public.a_pkey ATTACH PARTITION public.a_1_pkey;"),
    entry(
        "TRIGGER",
        "a t",
        "CREATE TRIGGER t BEFORE INSERT ON public.a FOR EACH ROW EXECUTE FUNCTION public.f();",
    ),
    constraint("a", "a_b", "FOREIGN KEY (b_id) REFERENCES public.b(id) DEFERRABLE", "FK CONSTRAINT"),
    constraint("b", "b_a", "FOREIGN KEY (a_id) REFERENCES public.a(id)", "FK CONSTRAINT"),
    constraint('"Big One"', "big_b", "FOREIGN KEY (id) REFERENCES public.b(id)", "FK CONSTRAINT"),
    entry("ACL", "TABLE a", "GRANT SELECT ON TABLE public.a TO reader;"),
]


def plan(tmp_path: Path):
    path = write(tmp_path, *DUMP)
    return plan_load(read_toc(path).entries, path)


def names(step) -> list[str]:
    return [f"{e.kind} {e.name}" for e in step.entries]


def test_pre_data_is_everything_before_the_first_data(tmp_path):
    assert [e.kind for e in plan(tmp_path).pre_data] == ["TABLE", "TABLE", "TABLE", "TABLE ATTACH"]


def test_steps_wait_for_what_they_need(tmp_path):
    steps = plan(tmp_path).steps
    by_name = {names(s)[0]: n for n, s in enumerate(steps)}
    data_a, data_big = by_name["TABLE DATA a"], by_name['TABLE DATA "Big One"']
    assert all(
        steps[n].barrier == 0 and not steps[n].after for n in (data_a, data_big, by_name["SEQUENCE SET s"])
    )
    assert steps[data_big].weight > steps[data_a].weight
    key = steps[by_name["CONSTRAINT a a_pkey"]]
    assert names(key) == [
        "CONSTRAINT a a_pkey",
        "COMMENT CONSTRAINT a_pkey ON public.a",
    ]  # its comment goes with it
    assert key.after == {data_a} and key.exclusive == {b"public.a"}
    big = steps[by_name["INDEX big_id"]]
    assert big.after == {data_big} and big.shared == {b'public."Big One"'} and not big.exclusive
    attach, trigger = by_name["INDEX ATTACH a_1_pkey"], by_name["TRIGGER a t"]
    assert steps[attach].barrier == attach and steps[attach].weight == ORDERED
    assert steps[trigger].barrier == trigger
    first_key = by_name["FK CONSTRAINT a a_b"]
    for name in ("FK CONSTRAINT a a_b", "FK CONSTRAINT b b_a", 'FK CONSTRAINT "Big One" big_b'):
        assert steps[by_name[name]].barrier == first_key  # after all before them, not after each other
    assert steps[first_key].exclusive == {b"public.a", b"public.a_1", b"public.b"}  # with its partitions
    assert steps[by_name["ACL TABLE a"]].barrier == by_name["ACL TABLE a"]


def test_an_entry_whose_table_cannot_be_read_runs_in_order(tmp_path):
    odd = entry("INDEX", "odd", "CREATE INDEX odd ON public.a USING btree (id) /* odd */;")
    path = write(
        tmp_path, DUMP[0], copy("a", 3), entry("INDEX", "x", "CREATE INDEX x ON pg_temp_1.a(id);"), odd
    )
    steps = plan_load(read_toc(path).entries, path).steps
    assert [(s.barrier, s.weight == ORDERED) for s in steps] == [(0, False), (1, True), (2, False)]


def test_the_scheduler_never_runs_conflicting_steps_together(tmp_path):
    steps = plan(tmp_path).steps
    scheduler = _Scheduler(steps)
    order, running = [], []
    while len(scheduler.finished) < len(steps):
        while (found := scheduler.take()) is not None:
            running.append(found)
            order.append(found)
            others = [steps[n] for n in running if n != found]
            step = steps[found]
            assert all(
                not step.exclusive & (o.exclusive | o.shared) and not step.shared & o.exclusive
                for o in others
            )
            assert scheduler.done_prefix >= step.barrier and step.after <= scheduler.finished
        scheduler.done(running.pop(0))
    assert len(order) == len(steps) and order[0] == 1  # the biggest table's data first


def test_an_index_entry_that_alters_its_table_holds_the_table_alone(tmp_path):
    clustered = entry(
        "INDEX",
        "a_id",
        "CREATE INDEX a_id ON public.a USING btree (id);\n\nALTER TABLE public.a CLUSTER ON a_id;",
    )
    path = write(
        tmp_path,
        DUMP[0],
        copy("a", 3),
        clustered,
        entry("INDEX", "a_b", "CREATE INDEX a_b ON public.a USING btree (b_id);"),
    )
    _, alters, plain = plan_load(read_toc(path).entries, path).steps
    assert alters.exclusive == {b"public.a"} and not alters.shared
    assert plain.shared == {b"public.a"} and not plain.exclusive
