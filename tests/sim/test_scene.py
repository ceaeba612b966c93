"""The synthetic line: deterministic, and its truth matches its pixels."""

from __future__ import annotations

import numpy as np
import pytest

from service.sim import CLASSES, SCENARIOS, Scene
from service.sim.world import place, project, rotation


@pytest.fixture
def make_scene():
    def make(scenario: str = "conveyor", seed: int = 3, **kw: object) -> Scene:
        return Scene(scenario, seed=seed, **kw)  # type: ignore[arg-type]

    return make


def test_same_seed_same_frames_and_truth(make_scene) -> None:
    a, b = make_scene(seed=5), make_scene(seed=5)
    for i in (0, 17, 250):
        ia, ta = a.render(i)
        ib, tb = b.render(i)
        assert np.array_equal(ia, ib)
        assert ta.to_json() == tb.to_json()
    ic, _ = make_scene(seed=6).render(17)
    assert not np.array_equal(a.render(17)[0], ic)


def test_render_order_does_not_matter(make_scene) -> None:
    s1, s2 = make_scene(), make_scene()
    forward = [s1.render(i)[1].to_json() for i in (10, 400, 900)]
    backward = [s2.render(i)[1].to_json() for i in (900, 400, 10)][::-1]
    assert forward == backward


def test_truth_keypoints_are_the_homography_of_mm(make_scene) -> None:
    scene = make_scene()
    _, truth = scene.render(123)
    assert truth.instances
    for inst in truth.instances:
        np.testing.assert_allclose(
            inst.keypoints_px, project(scene.homography, inst.keypoints_mm), atol=1e-9
        )


def test_rigid_parts_match_their_template(make_scene) -> None:
    _, truth = make_scene().render(200)
    rigid = [i for i in truth.instances if i.class_name != "arm"]
    assert rigid
    for inst in rigid:
        tmpl = CLASSES[inst.class_id].template_mm
        assert tmpl is not None
        x, y, th = inst.pose_mm
        np.testing.assert_allclose(place(tmpl, x, y, th), inst.keypoints_mm, atol=1e-9)


def _hole_keypoints() -> dict[str, list[int]]:
    # keypoints that sit at the centre of a (dark) hole of the part
    return {"bracket": [3, 4], "flange": [0, 2, 3, 4]}


def test_rendered_holes_are_where_the_truth_says(make_scene) -> None:
    """Dark hole pixels at the keypoint, bright part pixels one hole-radius further out."""
    checked = 0
    for seed in (1, 2):
        scene = make_scene(seed=seed, scenario="calm")
        for index in (30, 95, 160):
            image, truth = scene.render(index)
            gray = image.astype(np.float32).mean(axis=2)
            for inst in truth.instances:
                holes = _hole_keypoints().get(inst.class_name, [])
                cls = CLASSES[inst.class_id]
                for k in holes:
                    if not inst.visible[k]:
                        continue
                    u, v = inst.keypoints_px[k]
                    if not (8 <= u < scene.width - 8 and 8 <= v < scene.height - 8):
                        continue
                    centre = gray[int(round(v)), int(round(u))]
                    # a ring just outside the hole, on the part, in mm -> px
                    hole_r = [
                        r
                        for (hx, hy, r) in cls.holes_mm
                        if np.allclose(np.array([hx, hy]), cls.template_mm[k])
                    ][0]  # type: ignore[index]
                    x, y, th = inst.pose_mm
                    ring_part = np.array(
                        [
                            [np.cos(a), np.sin(a)]
                            for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)
                        ]
                    )
                    ring_mm = place(
                        cls.template_mm[k] + (hole_r + 2.5) * ring_part @ rotation(0).T,  # type: ignore[index]
                        x,
                        y,
                        th,
                    )
                    ring_px = project(scene.homography, ring_mm)
                    ring = np.median([gray[int(round(q[1])), int(round(q[0]))] for q in ring_px])
                    assert centre < 90, (inst.class_name, k, centre)
                    assert ring > centre + 60, (inst.class_name, k, centre, ring)
                    checked += 1
    assert checked >= 10


def test_keypoint_hidden_by_the_gantry_is_not_visible(make_scene) -> None:
    scene = make_scene(scenario="calm", seed=4)
    found = 0
    for index in range(0, 600, 7):
        _, truth = scene.render(index)
        for inst in truth.instances:
            if inst.class_name == "arm" or "at_station" in inst.flags:
                continue
            for k, (xm, ym) in enumerate(inst.keypoints_mm):
                if -123.0 < xm < -102.0 and abs(ym) < 130:  # well inside the gantry bar
                    assert not inst.visible[k]
                    found += 1
    assert found > 0


def test_every_class_appears_and_boxes_hold_visible_keypoints(make_scene) -> None:
    scene = make_scene()
    seen = set()
    for index in range(0, 300, 10):
        _, truth = scene.render(index)
        for inst in truth.instances:
            seen.add(inst.class_name)
            x1, y1, x2, y2 = inst.box
            assert x1 < x2 and y1 < y2
            for (u, v), vis in zip(inst.keypoints_px, inst.visible, strict=True):
                if vis:
                    assert x1 - 1 <= u <= x2 + 1 and y1 - 1 <= v <= y2 + 1
            assert 0.0 < inst.in_view <= 1.0
    assert seen == {"bracket", "flange", "arm"}


def test_belt_stop_incident_freezes_parts(make_scene) -> None:
    scene = make_scene(scenario="conveyor", seed=1)
    stops = [i for i in scene.incidents(0, 300) if i.kind == "belt_stop"]
    assert stops, "the conveyor scenario scripts belt stops"
    inc = stops[0]
    t = inc.start_s + 1.0
    a = scene.render_at(t)[1]
    b = scene.render_at(t + 2.0)[1]
    assert a.belt_speed_mm_s == 0.0 and any(i.kind == "belt_stop" for i in a.incidents)
    pa = {i.uid: i.pose_mm for i in a.instances if i.uid.startswith("p")}
    pb = {i.uid: i.pose_mm for i in b.instances if i.uid.startswith("p")}
    assert pa and pa == {k: pb[k] for k in pa}
    c = scene.render_at(inc.end_s + 1.0)[1]
    assert c.belt_speed_mm_s == scene.belt_speed_mm_s
    pc = {i.uid: i.pose_mm for i in c.instances}
    moved = [uid for uid in pa if uid in pc]
    assert moved and all(pc[u][0] > pa[u][0] + 50 for u in moved)


def test_parts_move_at_belt_speed(make_scene) -> None:
    scene = make_scene(scenario="calm", belt_speed_mm_s=120.0)
    a = {i.uid: i.pose_mm for i in scene.render_at(3.0)[1].instances if i.uid.startswith("p")}
    b = {i.uid: i.pose_mm for i in scene.render_at(4.0)[1].instances if i.uid.startswith("p")}
    common = set(a) & set(b)
    assert common
    for uid in common:
        assert b[uid][0] - a[uid][0] == pytest.approx(120.0, abs=1e-6)


def test_calm_has_no_incidents_and_conveyor_has_all_kinds(make_scene) -> None:
    assert make_scene(scenario="calm").incidents(0, 600) == []
    kinds = {i.kind for i in make_scene(scenario="conveyor", seed=2).incidents(0, 600)}
    assert kinds == {"belt_stop", "station_empty", "arm_stall", "zone_intrusion"}


def test_station_empty_incident_removes_station_part(make_scene) -> None:
    scene = make_scene(scenario="conveyor", seed=2)
    inc = next(i for i in scene.incidents(0, 600) if i.kind == "station_empty")
    during = scene.render_at(inc.start_s + 0.5)[1]
    after = scene.render_at(inc.end_s + 0.5)[1]
    assert not during.station_occupied
    assert not any("at_station" in i.flags for i in during.instances)
    assert after.station_occupied and any("at_station" in i.flags for i in after.instances)


def test_arm_stall_freezes_arm(make_scene) -> None:
    scene = make_scene(scenario="conveyor", seed=2)
    inc = next(i for i in scene.incidents(0, 600) if i.kind == "arm_stall")
    a = next(i for i in scene.render_at(inc.start_s + 0.5)[1].instances if i.class_name == "arm")
    b = next(i for i in scene.render_at(inc.start_s + 3.0)[1].instances if i.class_name == "arm")
    np.testing.assert_allclose(a.keypoints_mm, b.keypoints_mm)


def test_misoriented_and_misplaced_parts_exist(make_scene) -> None:
    scene = make_scene(scenario="conveyor", seed=1)
    flags: set[str] = set()
    for t in np.arange(0, 240, 2.0):
        for inst in scene.render_at(float(t))[1].instances:
            flags.update(inst.flags)
    assert {"misoriented", "misplaced"} <= flags


def test_homography_is_oblique(make_scene) -> None:
    h = make_scene().homography
    # a true perspective: the projective row is not (0, 0, 1)
    assert abs(h[2, 1]) > 1e-4
    near = project(h, np.array([[0, -200], [10, -200]]))
    far = project(h, np.array([[0, 300], [10, 300]]))
    assert np.linalg.norm(near[1] - near[0]) > 1.2 * np.linalg.norm(far[1] - far[0])


def test_scenarios_and_sizes(make_scene) -> None:
    for name in SCENARIOS:
        image, truth = make_scene(scenario=name, width=320, height=240).render(5)
        assert image.shape == (240, 320, 3) and image.dtype == np.uint8
        assert truth.instances
    with pytest.raises(ValueError, match="unknown scenario"):
        Scene("nope")


def test_zone_intrusion_puts_a_hand_in_the_danger_zone(make_scene) -> None:
    scene = make_scene(scenario="conveyor", seed=2)
    inc = next(i for i in scene.incidents(0, 600) if i.kind == "zone_intrusion")
    before = scene.render_at(inc.start_s - 0.5)[1]
    during = scene.render_at((inc.start_s + inc.end_s) / 2)[1]
    assert not any(i.class_name == "hand" for i in before.instances)
    hands = [i for i in during.instances if i.class_name == "hand"]
    assert len(hands) == 1 and "in_danger_zone" in hands[0].flags
    assert any(i.kind == "zone_intrusion" for i in during.incidents)
