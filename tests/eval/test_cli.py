"""`mmtrain eval`, `generate` and `chat` end to end on the tiny model (in-process, through mmtrain.cli.main)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from eval_helpers import SAMPLE
from mmtrain.cli import main
from mmtrain.eval.chat import ChatSession, run_chat
from mmtrain.eval.generate import Generator, load_model

IMAGES = sorted((SAMPLE / "images").glob("*.jpg"))[:2]


def test_eval_command_writes_metrics_predictions_and_table(tiny, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    rc = main(["eval", "--model", str(tiny["model"]), "--shards", str(tiny["shards"]), "--limit", "10",
               "--batch-size", "4", "--max-new-tokens", "3", "--blank-images", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "blank images" in printed and "majority" in printed and "caption bleu" in printed
    assert "attributes micro f1" in printed and "attributes synonyms" in printed
    results = json.loads(out.read_text())
    assert {"metrics", "baseline", "blank_images"} <= set(results)
    assert sum(m["n"] for m in results["metrics"].values()) == 10
    assert sum(m["n"] for m in results["baseline"].values()) == 10
    rows = [json.loads(line) for line in (out.parent / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and sum(r["blank_images"] for r in rows) == 10


def test_eval_command_user_errors(tiny, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--shards", str(tiny["shards"])]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny["model"]), "--shards", str(tiny["shards"]), "--tasks", "vqa"]) == 2
    assert "unknown tasks" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny["model"]), "--shards", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_generate_prompt_and_requests(tiny, tmp_path, capsys):
    model = str(tiny["model"])
    assert main(["generate", "--model", model, "--image", str(IMAGES[0]), "--prompt", "Describe this product.",
                 "--max-new-tokens", "4"]) == 0
    single = capsys.readouterr().out.strip()
    requests = tmp_path / "req.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Describe this product.", "images": [str(IMAGES[0])]},
        {"prompt": "Compare <image> with <image>", "images": [str(IMAGES[0]), str(IMAGES[1])], "id": 7},
        {"prompt": "Say hello."}]) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", model, "--requests", str(requests), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [None, 7, None] and all(isinstance(r["answer"], str) for r in rows)
    assert rows[0]["answer"] == single  # batched with others, greedy: the same answer as alone
    assert main(["generate", "--model", model, "--prompt", "x", "--image", str(tmp_path / "nope.jpg")]) == 2
    assert main(["generate", "--model", model, "--prompt", "<image> and <image>", "--image", str(IMAGES[0])]) == 2
    assert main(["generate", "--model", model]) == 2
    assert main(["generate", "--model", model, "--prompt", "x", "--temperature", "-1"]) == 2


def test_chat_session_keeps_history_and_images(tiny):
    gen = Generator(load_model(tiny["model"]))
    session = ChatSession(gen, max_new_tokens=3)
    out = io.StringIO()
    lines = [f"/image {IMAGES[0]}\n", "What is this?\n", "And the colour?\n", "/image /no/such.jpg\n", "/bogus\n",
             "/reset\n", "hi\n", "/quit\n", "never read\n"]
    turns_seen = []
    ask = session.ask

    def recording_ask(text):
        answer = ask(text)
        turns_seen.append((len(session.turns), len(session.images)))
        return answer

    session.ask = recording_ask  # type: ignore[method-assign]
    run_chat(session, lines, out)
    text = out.getvalue()
    assert "image attached" in text and "no such image file" in text and "unknown command /bogus" in text
    assert "conversation cleared" in text
    assert turns_seen == [(2, 1), (4, 1), (2, 0)]  # history grows, the image stays with turn 1, /reset clears
    assert session.turns[0] == {"role": "user", "content": "hi"}
    # the first turn's prompt carried the image mark; its answer is the one generate gives for the same prompt
    first = gen.prompt([{"role": "user", "content": "<image>\nWhat is this?"}], [Path(IMAGES[0]).read_bytes()])
    assert gen.generate([first], max_new_tokens=3)[0] in text
