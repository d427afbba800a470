"""The run around the method: train (with progress lines, checkpoints and Ctrl-C), evaluate, report.

fit_and_report(model, data, s) is what every train_*.py calls once its recipe has chosen what trains. It
holds the run's lock throughout (checkpoint.run_lock), so the same run started twice at once runs once:
  train()     common.train_epoch's steps on the decoded data, with a progress line every 15 s, a
              checkpoint every --checkpoint-every minutes and on Ctrl-C/SIGTERM (checkpoint.py), and
              --resume continuing a stopped run bit for bit
  evaluate()  LoRA merged (one matmul per layer): test metrics, and with --val-samples the validation
              metrics and a temperature fitted there (the test set is never used to fit anything)
  report()    the results row (results_file.py), the calibration JSON and logits .npz beside it,
              --save-adapter
"""
import datetime
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import cli
import common
import cpu
import lora
import sources
from results_file import CSV_COLUMNS, RunError, UsageError, append_result, csv_line


def fit_and_report(model, data: sources.Data, s) -> dict:
    """Train for s.epochs, evaluate, append the results row (and save the adapter); returns the row."""
    with checkpoint.run_lock(s):  # the same run started twice at once: the second is refused
        breakdown = common.param_breakdown(model)
        print(common.format_breakdown(breakdown) + "  |  lr " + ", ".join(f"{k} {v:g}" for k, v in s.lrs.items()))
        train_split, val, test = sources.load_data(data, s)
        epoch_times, compile_time_s = train(model, train_split, s)
        metrics = evaluate(model, val, test, s)
        return report(model, data.name, train_split, breakdown, epoch_times, compile_time_s, metrics, s)


# ----------------------------------------------------------------------------- train

def train(model, data: common.Split, s):
    """All epochs, from the start or from the run's checkpoint (--resume); -> (seconds per epoch,
    compile warm-up seconds). Between two steps it logs, and on a signal or the checkpoint clock it
    saves and stops or goes on."""
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    net = torch.compile(model) if s.compile else model
    steps = math.ceil(len(data.labels) / s.batch_size)
    opt, sched = common.make_optimizer(model, s.lrs, s.weight_decay, s.epochs * steps)
    g = torch.Generator().manual_seed(s.seed)  # data order and augmentation
    cpu.use_speed_paths(model, s.precision, training=True)
    compile_time_s = compile_warmup(net, model, data, s, mean, std) if s.compile else 0.0
    if s.compile:
        print(f"compile: warm-up {compile_time_s:.1f}s (not counted in train_time_s)")
    path = checkpoint.file_for(s)
    # a fresh run, or one continued from its checkpoint: weights, AdamW, schedule, both RNGs, losses, time
    progress = checkpoint.restore(path, s, model, opt, sched, g) if s.resume else checkpoint.Progress()
    log_every_s = 0.0 if os.environ.get("PEFT_LOG_EVERY_STEP") == "1" else 15.0  # 0: every step, full precision
    with checkpoint.stop_on_signals(s.checkpoint_every) as stop:
        if s.resume:
            print(f"resumed {path} {progress.where(steps, s.epochs)} "
                  f"({sum(progress.epoch_times) + progress.time_s:.1f}s of training done)", flush=True)
        if s.checkpoint_every:
            print(f"training: checkpoints every {s.checkpoint_every:g} min, at each epoch's end and on "
                  f"Ctrl-C/SIGTERM, in {path}", flush=True)
        while progress.epoch <= s.epochs:
            if progress.order is None:
                progress.order = torch.randperm(len(data.labels), generator=g)
            start = len(progress.losses)  # steps of this epoch done before (a resumed run)
            batches = common.train_batches(data, progress.order[start * s.batch_size:], g, s.batch_size,
                                           s.img_size, mean, std)
            t0 = last_log = time.perf_counter()
            for step, loss in common.train_epoch(net, opt, sched, batches, s.precision, start):
                check_finite(loss, progress.epoch, step, steps, s.lr)
                progress.losses.append(loss.item())
                now = time.perf_counter()
                if now - last_log >= log_every_s or step + 1 == steps:
                    log_step(progress, step, steps, len(data.labels), s.batch_size, start, now - t0, log_every_s)
                    last_log = now
                if step + 1 < steps and stop.due():
                    break  # save a checkpoint, then stop or go on
            progress.time_s += time.perf_counter() - t0
            if len(progress.losses) == steps:
                print(f"epoch {progress.epoch}/{s.epochs}: mean loss {np.mean(progress.losses):.6f}, "
                      f"{progress.time_s:.1f}s ({len(data.labels) / progress.time_s:.1f} img/s)", flush=True)
                progress.finish_epoch()
            saved = checkpoint.save(path, model, opt, sched, g, progress, s) if s.checkpoint_every else False
            stop.saved()
            if stop.signum:
                raise checkpoint.interrupted(stop.signum, path, saved, progress.where(steps, s.epochs))
    return progress.epoch_times, compile_time_s


def check_finite(loss, epoch: int, step: int, steps: int, lr: float):
    if not torch.isfinite(loss):
        raise RunError(f"the loss became {loss.item()} at epoch {epoch}, step {step + 1}/{steps}. "
                       f"Training diverged: lower the learning rate, e.g. --lr {lr / 10:g} "
                       f"(was {lr:g}). No row was written.")


def log_step(progress, step: int, steps: int, n: int, batch_size: int, start: int, elapsed: float,
             log_every_s: float):
    """'  epoch E step S/N  loss L  R img/s  eta M:SS' (the loss in full precision with
    PEFT_LOG_EVERY_STEP=1)."""
    done = min(n, (step + 1) * batch_size)
    rate = (done - start * batch_size) / elapsed
    shown = f"{progress.losses[-1]:.4f}" if log_every_s else repr(progress.losses[-1])
    print(f"  epoch {progress.epoch} step {step + 1}/{steps}  loss {shown}  {rate:.1f} img/s  "
          f"eta {cli.format_duration((n - done) / rate)}", flush=True)


def compile_warmup(net, model, data: common.Split, s, mean, std) -> float:
    """Compile the training graph with a forward and backward pass on the first batch, before the training
    clock starts; returns the seconds it took. No optimizer step, gradients cleared, RNG streams untouched,
    so the run's numbers are those of a run without it."""
    t0 = time.perf_counter()
    net.train()
    x = common.to_model_input(data.images[:s.batch_size], s.img_size, mean, std)
    with torch.random.fork_rng(devices=[]):  # LoRA dropout draws from torch's RNG: give it back as it was
        with common.autocast(s.precision):
            logits = net(x)
        F.cross_entropy(logits.float(), data.labels[:s.batch_size]).backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- evaluate

def evaluate(model, val, test: common.Split, s) -> dict:
    """Test (and validation) metrics with LoRA merged; the temperature is fitted on validation only."""
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    t0 = time.perf_counter()
    cpu.use_speed_paths(model, s.precision, training=False)
    lora.merge_lora(model)  # one matmul per layer instead of three: evaluation at backbone speed
    # the eager model, not the compiled one: merged weights would make --compile recompile
    logits = common.predict(model, test.images, s.batch_size, s.img_size, mean, std, s.precision)
    val_logits = common.predict(model, val.images, s.batch_size, s.img_size, mean, std, s.precision) if val else None
    lora.unmerge_lora(model)
    m = dict(eval_time=time.perf_counter() - t0, labels=test.labels.numpy(), probs=common.softmax(logits),
             logits=logits, val_logits=val_logits, val_labels=val.labels.numpy() if val else None)
    m["acc"] = common.accuracy(m["probs"], m["labels"])
    m["ece"] = 100.0 * common.expected_calibration_error(m["probs"], m["labels"])
    print(f"acc@1 {m['acc']:.2f} %  ece {m['ece']:.2f} %  ({len(m['labels'])} test images, {m['eval_time']:.1f}s)")
    if not (math.isfinite(m["acc"]) and math.isfinite(m["ece"])):
        raise RunError("the metrics are not finite; no row was written. Try a lower --lr.")
    m["val"] = dict.fromkeys(("val_acc@1", "val_ece", "temperature", "ece_ts"), "")
    if val:
        val_labels = val.labels.numpy()
        val_probs, t = common.softmax(val_logits), common.fit_temperature(val_logits, val_labels)
        m["val"] = {"val_acc@1": f"{common.accuracy(val_probs, val_labels):.2f}",
                    "val_ece": f"{100 * common.expected_calibration_error(val_probs, val_labels):.2f}",
                    "temperature": f"{t:.4f}",
                    "ece_ts": f"{100 * common.expected_calibration_error(common.softmax(logits, t), m['labels']):.2f}"}
        print(f"validation: acc@1 {m['val']['val_acc@1']} %  ece {m['val']['val_ece']} %  ({len(val_labels)} images); "
              f"temperature {t:.3f} fitted there -> test ece {m['val']['ece_ts']} % (acc@1 unchanged)")
    return m


# ----------------------------------------------------------------------------- report

def results_row(ts, dataset, n_train, breakdown, epoch_times, compile_time_s, m, s, calibration_file) -> dict:
    """The results CSV row: the card's nine columns first, then what reproduces the run."""
    def number(v):  # the LoRA columns are blank for methods without LoRA
        return "" if v is None else f"{v:g}"
    return {
        "ts": ts, "method": s.method, "dataset": dataset, "backbone": s.backbone,
        "tuned_params_%": f"{breakdown['pct']:.4f}", "acc@1": f"{m['acc']:.2f}", "ece": f"{m['ece']:.2f}",
        "train_time_s": f"{sum(epoch_times):.1f}", "epochs": s.epochs,
        "time_per_epoch_s": f"{np.mean(epoch_times):.1f}", "eval_time_s": f"{m['eval_time']:.1f}",
        "img_size": s.img_size, "train_samples": n_train, "eval_samples": len(m["labels"]),
        "batch_size": s.batch_size, "lr": f"{s.lr:g}", "weight_decay": f"{s.weight_decay:g}",
        "seed": s.seed, "lora_r": s.lora_r or "", "lora_alpha": number(s.lora_alpha),
        "lora_dropout": number(s.lora_dropout), "lora_targets": ",".join(s.lora_targets),
        "train_head": int(not s.no_train_head), "precision": s.precision, "threads": s.threads,
        "weights": sources.weights_source(s), "torch": torch.__version__.split("+")[0],
        "calibration_file": calibration_file, "val_samples": s.val_samples, **m["val"],
        # a group's own column only where it is not the method's main group (whose rate is `lr`)
        **{f"{k}_lr": f"{s.lrs[k]:g}" if k in s.lrs and k != common.main_group(s.method) else ""
           for k in ("head", "norm")},
        "compile_time_s": f"{compile_time_s:.1f}" if s.compile else "",
        "cpu": cpu.cpu_name(), "run_key": s.run_key, "weights_sha256": sources.weights_sha256(s),
    }


def report(model, dataset: str, train_split, breakdown, epoch_times, compile_time_s, m: dict, s) -> dict:
    """Append the row (the run's result), then drop its checkpoint and save the adapter."""
    ts = datetime.datetime.now().isoformat(timespec="seconds")
    calibration_file = write_calibration(s.results, ts, s.method, m)
    row = results_row(ts, dataset, len(train_split.labels), breakdown, epoch_times, compile_time_s, m, s,
                      calibration_file)
    try:
        append_result(s.results, row)
    except (UsageError, OSError) as e:  # e.g. the file was replaced during the run: keep the numbers
        raise RunError(f"{e}\nThe finished run's row, for pasting by hand:\n"
                       + csv_line(CSV_COLUMNS) + csv_line(row[c] for c in CSV_COLUMNS))
    print(f"results: appended {s.method} row to {s.results}")
    checkpoint.discard(s)  # the row is the run's result now
    if s.save_adapter:  # after the row: a full disk here must not cost the run's numbers
        meta = dict(ts=ts, dataset=dataset, classes=train_split.classes, acc=m["acc"], ece=m["ece"])
        try:
            save_adapter(s.save_adapter, model, s, compile_time_s, meta)
        except (OSError, RuntimeError) as e:
            raise RunError(f"the row was written, but the adapter could not be saved to {s.save_adapter} "
                           f"({type(e).__name__}: {e}). Free some space or pick another --save-adapter path.")
        print(f"adapter: {s.save_adapter} ({os.path.getsize(s.save_adapter) / 1e6:.2f} MB)"
              + (": the whole model (a full fine-tune trains every parameter)" if s.method == "full" else ""))
    return row


def write_calibration(results_path, ts, method, m: dict) -> str:
    """Per-bin reliability numbers as a small JSON beside the CSV, and the run's logits and labels in an
    .npz of the same name (named in the JSON as logits_file); returns the JSON's path relative to the CSV."""
    conf, acc, count = common.calibration_bins(m["probs"], m["labels"])
    folder = os.path.splitext(results_path)[0] + "_calibration"
    os.makedirs(folder, exist_ok=True)
    stem = f"{ts.replace('-', '').replace(':', '')}_{method}"
    for k in range(100):  # two runs of one method in the same second get distinct files
        path = os.path.join(folder, stem + (f"_{k}" if k else "") + ".json")
        try:
            with open(path, "x") as f:
                logits_file = write_logits(path[:-len(".json")] + ".npz", m)
                json.dump(dict(ts=ts, method=method, n_bins=len(count), ece=m["ece"],
                               bin_edges=np.linspace(0, 1, len(count) + 1).tolist(), confidence=conf.tolist(),
                               accuracy=acc.tolist(), count=count.tolist(), logits_file=logits_file), f, indent=1)
            return os.path.relpath(path, os.path.dirname(results_path))
        except FileExistsError:
            continue
    raise RunError(f"could not create a calibration file in {folder}")


def write_logits(path: str, m: dict) -> str:
    """test_logits / test_labels (and val_logits / val_labels with --val-samples) in a compressed .npz
    (about 0.4 MB for 10,000 x 10); returns its file name, relative to the calibration JSON. The logits
    stay float32, exactly as evaluated: float16 would move an ECE that sits on a rounding edge by 0.01,
    and every number of the row must come back from the file exactly."""
    arrays = dict(test_logits=np.asarray(m["logits"], dtype=np.float32), test_labels=m["labels"].astype(np.int16))
    if m.get("val_logits") is not None:
        arrays.update(val_logits=np.asarray(m["val_logits"], dtype=np.float32),
                      val_labels=m["val_labels"].astype(np.int16))
    with open(path, "xb") as f:  # np.savez_compressed would add ".npz" to a name; a file object it takes as is
        np.savez_compressed(f, **arrays)
    return os.path.basename(path)


def save_adapter(path, model, s, compile_time_s: float, meta: dict):
    """Only the trained tensors (LoRA factors, LayerNorms, head) plus what rebuilds the backbone.

    The new head is stored even with --no-train-head (1,930 numbers): it is not part of the
    backbone, so evaluate.py need not re-draw its random init. settings records how the backbone
    was made: no_pretrained + seed (random init, re-created by seeding), or weights (a file, whose
    sha256 goes into meta so evaluate.py can tell if the file changed), or neither (timm download).
    """
    state = {n: p.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad or n.startswith("head.")}
    settings = {k: (list(v) if isinstance(v, tuple) else dict(v) if k in ("lrs", "run_settings") else v)
                for k, v in vars(s).items()}
    settings["compile_time_s"] = compile_time_s
    settings["data_dir"] = os.path.abspath(s.data_dir)  # evaluate.py may run from another folder
    meta = dict(meta, format=1, weights_source=sources.weights_source(s),
                weights_sha256=sources.file_sha256(s.weights) if s.weights else None)
    checkpoint.atomic_save(dict(state=state, settings=settings, meta=meta), path)  # an old file stays whole
