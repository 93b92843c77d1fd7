"""User representations for PAT: a style vector that follows how people write, not what about, and a
topic vector that follows what about; both from training-split texts only."""
import numpy as np

from helpers import example_row, make_settings, write_rows
from restpg import catalog, models, user_profiles
from restpg.embedding import embed_texts

# Style 1: long, comma-rich, measured sentences; style 2: short, shouted, exclamation-heavy fragments.
KETTLES_1 = ["The kettle, which I bought in the spring, boils water quietly, and the handle stays cool in the hand.",
             "Although the lid is a little stiff, the spout pours cleanly, and the base sits firmly on the counter."]
KETTLES_1_HELD_OUT = ["The kettle heats a full litre in about four minutes, which is fine, and the switch clicks off reliably.",
                      "Its steel body, though it shows fingerprints, cleans easily, and the filter catches most of the scale."]
KETTLES_2 = ["LOVE this kettle!!! Boils SO fast!", "Lid is stiff. Ugh! Still great!!", "Handle cool! Pours well!! Buy it!"]
STARS_1 = ["The telescope, which arrived in a sturdy box, shows the rings of Saturn clearly, and the mount turns smoothly.",
           "Although the finder scope is a little loose, the eyepieces are sharp, and the tripod holds steady in the wind."]


def _vectors(settings, groups: dict) -> tuple[dict, dict]:
    raw = {name: user_profiles.style_features(texts) for name, texts in groups.items()}
    mean, scale = user_profiles.standardize(np.stack(list(raw.values())))
    style = {name: user_profiles.zscore(v, mean, scale) for name, v in raw.items()}
    env = models.worker_env(settings)
    topic = {name: np.asarray(user_profiles.mean_unit(list(embed_texts(texts, settings.models.retriever, env))))
             for name, texts in groups.items()}
    return style, topic


def test_style_follows_the_writer_and_topic_follows_the_subject(settings):
    style, topic = _vectors(settings, {"a": KETTLES_1, "a_held_out": KETTLES_1_HELD_OUT, "b": KETTLES_2, "d": STARS_1})
    sim = lambda x, y: float(user_profiles.style_similarity(style[x], style[y][None, :])[0])
    cos = lambda x, y: float(topic[x] @ topic[y])
    # same topics, other style: farther in style than the user and their own held-out texts
    assert sim("a", "a_held_out") > sim("a", "b")
    # one style, other topics: closer in style than the same-topic writer of another style ...
    assert sim("a", "d") > sim("a", "b")
    # ... and the topic vector says the opposite
    assert cos("a", "b") > cos("a", "d")


def test_style_features_are_rates_and_empty_is_zero():
    assert user_profiles.style_features([]).tolist() == [0.0] * len(user_profiles.FEATURES)
    one, twice = user_profiles.style_features(["Fine. Good, really!"]), user_profiles.style_features(["Fine. Good, really!"] * 2)
    assert np.allclose(one[2:], twice[2:])  # rates do not grow with the amount of text
    assert len(one) == len(user_profiles.FEATURES)


def test_authored_text_prefers_the_users_own_fields():
    fields = [("overall", "5"), ("description", "A steel kettle 1.7 l"), ("summary", "Nice"), ("reviewText", "Boils fast.")]
    assert user_profiles.authored_text("product_review", "rendered", fields) == "Nice\nBoils fast."
    assert user_profiles.authored_text("product_review", "rendered", {}) == "rendered"


def test_profiles_use_training_split_texts_only(spark, tmp_path):
    s = make_settings(tmp_path / "home")
    rows = [example_row("e1", "u1", target="Train target of u1."),
            example_row("e2", "u1", split="test", target="SECRET test target!!!", profile=[
                {"item_id": "secret", "text": "SECRET test profile item!!!"}]),
            example_row("e3", "u2", target="Another, calmer, target."),
            example_row("e4", "u3", split="val", target="Only in val.")]
    write_rows(spark, s, "examples", rows)
    report = user_profiles.run(spark, s, run_id="t")
    got = {r.user_id: r for r in catalog.read(spark, s, "user_profiles").collect()}
    assert set(got) == {"u1", "u2"} and report["users"] == 2 and report["eval_users"] == 1
    assert got["u1"].eval_user and not got["u2"].eval_user  # u1 has a test example: never a peer
    assert got["u1"].n_topic_texts == 4 and got["u1"].n_style_texts == 4  # 3 train profile items + its train target
    want = user_profiles.style_features([it["text"] for it in rows[0]["profile"]] + ["Train target of u1."])
    assert np.allclose(np.asarray(got["u1"].style), want)  # nothing of the test example (no "!!!", no caps)
    assert abs(np.linalg.norm(got["u2"].topic) - 1) < 1e-4
    user_profiles.run(spark, s, run_id="t2")
    assert catalog.read(spark, s, "user_profiles").count() == 2  # rerun replaces its slice
