import json

import pytest


def test_monitor_end_to_end(load_example, shared_data, small_model_dir, tmp_path):
    monitor = load_example("financial_monitor/monitor.py")
    out = tmp_path / "fm"
    monitor.main(["run", "--data", str(shared_data / "financial_phrasebank"), "--model", str(small_model_dir),
                  "--output", str(out), "--steps", "60", "--lr", "5e-3"])
    report = json.loads((out / "report.json").read_text())
    burst = report["burst_replay"]
    assert burst["bursts"] == 2 and burst["recall"] == 1.0  # every injected burst raises an alert
    assert burst["true_alerts"] >= burst["alerts"] - 1  # at most one false alarm on the short run
    assert report["neutral_replay"]["alerts"] == 0  # and none on the all-neutral replay
    rows = [json.loads(line) for line in (out / "burst_replay_scored.jsonl").read_text().splitlines()]
    negative = [r["p_negative"] for r in rows if r["label"] == "negative"]
    other = [r["p_negative"] for r in rows if r["label"] != "negative"]
    assert sum(negative) / len(negative) > sum(other) / len(other)  # the injected bursts stand out in the scores
    assert (out / "burst_replay.png").stat().st_size > 0


def test_monitor_names_missing_data(load_example, tmp_path, capsys):
    monitor = load_example("financial_monitor/monitor.py")
    with pytest.raises(SystemExit):
        monitor.main(["run", "--data", str(tmp_path)])
    assert "Financial PhraseBank not found" in capsys.readouterr().err
    stream = tmp_path / "stream.jsonl"
    stream.write_text('{"time": "2024-01-01T00:00:00", "text": "Shares fell"}\n')
    with pytest.raises(SystemExit):
        monitor.main(["watch", "--stream", str(stream), "--classifier", str(tmp_path)])
    assert "holds no fine-tuned classifier" in capsys.readouterr().err
