import json

import pytest

from e2p.data.persona import LoadReport, load_persona, persona_split, person_id
from e2p.errors import DataError

CONVAI = """1 your persona: i like dogs.
2 your persona: i am a nurse.
3 partner's persona: i play guitar.
4 hi , how are you ?\ti am good , just walked my dogs .
5 nice ! i play guitar .\tcool , i work nights as a nurse .
garbage line without a number
1 your persona: i love cats.
2 hello\thi there
"""
SPC = '''user 1 personas,user 2 personas,Best Generated Conversation
"I like dogs.
I am a nurse.","I play guitar.","User 1: Hi!
User 2: Hello, how are you?
User 1: Good, I just walked my dogs.
*User 2:* Nice, I was playing guitar."
"A.","B.","no speaker labels here
at all"
'''


def test_convai2_both_speakers_and_skips(tmp_path):
    (tmp_path / "c_valid.txt").write_text(CONVAI)
    r = LoadReport()
    ex = load_persona(tmp_path, report=r)
    selfs = [e for e in ex if "i like dogs." in e.persona]
    partners = [e for e in ex if "i play guitar." in e.persona]
    assert [e.reply for e in selfs] == ["i am good , just walked my dogs .", "cool , i work nights as a nurse ."]
    assert [e.reply for e in partners] == ["nice ! i play guitar ."]
    assert selfs[1].history[-1] == ("user", "nice ! i play guitar .")
    assert r.skipped.get("malformed convai2 lines") == 1


def test_spc_markup_and_unlabeled_rows(tmp_path):
    (tmp_path / "s_test.csv").write_text(SPC)
    r = LoadReport()
    ex = load_persona(tmp_path / "s_test.csv", report=r)
    assert [e.reply for e in ex] == ["Hello, how are you?", "Good, I just walked my dogs.", "Nice, I was playing guitar."]
    assert r.skipped == {"spc rows without speaker labels or personas": 1}


def test_msc_sessions_keep_person_id(tmp_path):
    init = [["i like dogs."], ["i play guitar."]]
    s1 = {"dialog": [{"id": "bot_0", "text": "hi"}, {"id": "bot_1", "text": "hello"}], "init_personachat": {"init_personas": init}}
    s2 = {"personas": [["i like dogs.", "i got a puppy."], ["i play guitar."]], "init_personas": init,
          "dialog": [{"id": "Speaker 1", "text": "hey again"}, {"id": "Speaker 2", "text": "good to see you"}]}
    (tmp_path / "msc_personasummary_session_1_valid.txt").write_text(json.dumps(s1) + "\n{broken\n")
    (tmp_path / "msc_dialogue_session_2_valid.txt").write_text(json.dumps(s2) + "\n")
    r = LoadReport()
    ex = load_persona(tmp_path, report=r)
    assert len({e.person_id for e in ex}) == 1  # both replies come from bot_1 / Speaker 2: one person
    assert r.skipped == {"malformed msc lines": 1}
    assert person_id(["I play guitar"]) == person_id(["i play guitar."])


def test_msc_worker_id_speaker_is_inferred_from_alternation(tmp_path):
    """Real MSC session files label some first turns with a crowd worker's id instead of "Speaker 1"."""
    init = [["i like dogs."], ["i play guitar."]]
    ok = {"personas": init, "init_personas": init,
          "dialog": [{"id": "42306", "text": "what dogs?"}, {"id": "Speaker 2", "text": "a terrier."},
                     {"id": "Speaker 1", "text": "nice."}]}
    bad = {"personas": init, "init_personas": init,  # no neighbour says who 777 is
           "dialog": [{"id": "777", "text": "a"}, {"id": "888", "text": "b"}]}
    (tmp_path / "msc_dialogue_session_2_valid.txt").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    r = LoadReport()
    ex = load_persona(tmp_path, report=r)
    by_reply = {e.reply: e for e in ex}
    assert by_reply["a terrier."].persona == ("i play guitar.",)  # Speaker 2 answers the worker-id turn
    assert by_reply["nice."].history == (("assistant", "what dogs?"), ("user", "a terrier."))  # Speaker 1 again
    assert r.repaired == {"msc turns labelled with a worker id (speaker inferred from alternation)": 1}
    assert r.skipped == {"malformed msc lines": 1}
    assert "repaired: 1" in str(r)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError):
        load_persona(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="columns"):
        load_persona(tmp_path)


def test_real_split_is_leakage_free(shared_data):
    train, test = persona_split(shared_data)
    assert len(train) > 10000 and len(test) > 5000
    assert not {e.person_id for e in train} & {e.person_id for e in test}
    assert all("test" in e.source.lower() for e in test)


def test_split_drops_test_sentences_and_can_add_msc(tmp_path):
    (tmp_path / "c_valid.txt").write_text(CONVAI)
    (tmp_path / "s_test.csv").write_text(SPC)  # its personas share "I like dogs." / "I am a nurse." with ConvAI2
    init = [["i sail boats."], ["i bake bread."]]
    s2 = {"personas": [["i sail boats."], ["i bake bread.", "I am a nurse."]], "init_personas": init,
          "dialog": [{"id": "Speaker 1", "text": "hey again"}, {"id": "Speaker 2", "text": "good to see you"}]}
    (tmp_path / "msc_dialogue_session_2_valid.txt").write_text(json.dumps(s2) + "\n")
    train, test = persona_split(tmp_path)
    test_sentences = {s.lower().rstrip(".") for e in test for s in e.persona}
    assert all(s.lower().rstrip(".") not in test_sentences for e in train for s in e.persona)
    assert not any(e.source.startswith("msc") for e in train)
    # people whose whole persona is test sentences are gone ("i like dogs." + "i am a nurse."; "i play guitar.")
    assert {e.persona for e in train} == {("i love cats.",)}
    with_msc, _ = persona_split(tmp_path, include_msc=True)
    msc = [e for e in with_msc if e.source.startswith("msc")]
    assert [e.persona for e in msc] == [("i bake bread.",)]  # its test sentence removed, the rest kept


def test_people_halves_are_disjoint_and_cover_everyone():
    from e2p.data.persona import PersonaExample, people_half, person_id

    examples = [PersonaExample(person_id([f"i like thing {i}."]), (f"i like thing {i}.",), (("user", "hi"),), "ok")
                for i in range(20)]
    halves = [people_half(examples, h) for h in (0, 1)]
    ids = [{e.person_id for e in half} for half in halves]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert len(halves[0]) + len(halves[1]) == len(examples)
