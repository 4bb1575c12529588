import json

import pytest


def test_recommender_end_to_end(load_example, shared_data, small_model_dir, tmp_path):
    recommend = load_example("recommender/recommend.py")
    out = tmp_path / "rec"
    readers = 30
    report = recommend.main(["--data", str(shared_data / "ag_news"), "--model", str(small_model_dir),
                             "--output", str(out), "--articles", "240", "--readers", str(readers),
                             "--train-articles", "400", "--train-readers", "60", "--steps", "30",
                             "--candidates", "15", "--reranker-layers", "0"])  # the 4-layer model is small already
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    metrics = report["metrics"]
    assert list(metrics) == list(recommend.METHODS)
    for name, m in metrics.items():
        assert 0.0 <= m["recall@10"] <= 1.0 and 0.0 <= m["ndcg@10"] <= 1.0, name
        assert m["ndcg@10"] <= metrics["simulation ceiling"]["ndcg@10"] + 1e-9, name
    best = max(metrics[name]["ndcg@10"] for name in recommend.METHODS[1:4])
    assert best > metrics["popularity"]["ndcg@10"]
    rows = [json.loads(line) for line in (out / "readers.jsonl").read_text().splitlines()]
    assert len(rows) == readers
    for row in rows:
        assert abs(sum(row["interest"].values()) - 1.0) < 1e-2 and len(row["held_out"]) == 4
        for name, top in row["top10"].items():
            assert len(set(top)) == 10 and not set(top) & set(row["read"]), name  # nothing already read
    report_md = (out / "report.md").read_text()
    assert "| popularity |" in report_md and "AUC" in report_md
    assert 0.0 <= report["reranker_auc"] <= 1.0 and 0 < report["shortlist_held_out"] <= readers * 4
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / "reranker" / "laformer_finetune.json").is_file()


def test_recommender_names_missing_data(load_example, tmp_path, capsys):
    recommend = load_example("recommender/recommend.py")
    with pytest.raises(SystemExit):
        recommend.main(["--data", str(tmp_path)])
    assert "AG News not found" in capsys.readouterr().err


def test_recommender_names_missing_extra(load_example, monkeypatch):
    from laformer.extras import MissingExtraError

    recommend = load_example("recommender/recommend.py")
    import sys

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed, even once imported
    with pytest.raises(MissingExtraError, match=r'pip install "laformer\[train\]"'):
        recommend.build_catalog(["a b", "a c"], ["World", "World"], per_topic=1, seed=0)
