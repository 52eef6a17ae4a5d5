from ds_bilevel.schedule import events, outer_step_count, split_d1_d2


def test_bilevel_events_alternate_with_unroll():
    assert list(events("bilevel", 4, unroll_steps=2, outer_steps=1)) == [
        ("inner", 0), ("inner", 1), ("outer", 0), ("inner", 2), ("inner", 3), ("outer", 1)]
    assert list(events("bilevel", 2, unroll_steps=1, outer_steps=2)) == [
        ("inner", 0), ("outer", 0), ("outer", 1), ("inner", 1), ("outer", 2), ("outer", 3)]
    assert outer_step_count("bilevel", 5, 2, 3) == 6


def test_one_level_and_sharpness_events():
    assert list(events("one_level", 3)) == [("inner", 0), ("inner", 1), ("inner", 2)]
    assert list(events("sharpness", 2)) == [("sharpness", 0), ("sharpness", 1)]
    assert outer_step_count("one_level", 9, 1, 1) == 0 and outer_step_count("sharpness", 9, 1, 1) == 9


def test_split_is_seeded_disjoint_and_covering():
    d1, d2 = split_d1_d2(100, 0.8, seed=3)
    assert (len(d1), len(d2)) == (80, 20)
    assert sorted(d1 + d2) == list(range(100))
    assert split_d1_d2(100, 0.8, seed=3) == (d1, d2)
    assert split_d1_d2(100, 0.8, seed=4) != (d1, d2)
