// A job's training curves: loss and learning rate against the step, the warm-up's end and the
// learning-rate drops as vertical lines, validation accuracy/loss as points. The history comes
// from GET /v1/jobs/{id}/metrics (when the panel opens and when the job ends); while the job
// trains, each progress event adds its step (app.js does the fetching and feeds CurveStore).
// Drawn with uPlot (vendor/uplot, loaded before this file); CurveStore is plain data, also
// loaded by node in tests/integration/test_ui_views.py.
"use strict";

// Live points are kept to about this many: the page may follow a job for hours, and the
// endpoint itself sends at most ~500 (every `stride`-th step).
const CURVE_MAX_POINTS = 1000;

const finite = (v) => typeof v === "number" && Number.isFinite(v);

// A learning rate in few characters: 0.003, 3.00e-5 (fine-tuning rates are often below 1e-3).
function lrText(v, digits = 3) {
  if (!finite(v)) return "–";
  if (v === 0) return "0";
  return Math.abs(v) < 1e-3 ? v.toExponential(digits - 1) : String(Number(v.toPrecision(digits)));
}

class CurveStore {
  constructor(jobId) {
    this.jobId = jobId;
    this.training = []; // {step, loss, lr, ips}, steps ascending (loss null: diverged)
    this.validation = []; // {step, accuracy, loss}, steps ascending
    this.schedule = null; // {warmup_steps, decay_steps, total_steps}
    this.version = 0; // bumped on every change: the chart redraws only then
  }

  // The schedule from the job's plan: known before any history arrives.
  setPlan(plan) {
    if (this.schedule || !plan || !finite(plan.total_steps)) return;
    this.schedule = scheduleOf(plan);
    this.version += 1;
  }

  // The history the server kept (authoritative); live points past its last step stay.
  setMetrics(m) {
    const training = (m.training || []).filter((p) => finite(p.step)).map(pointOf);
    const last = training.length ? training[training.length - 1].step : -1;
    this.training = training.concat(this.training.filter((p) => p.step > last));
    this.validation = (m.validation || [])
      .filter((p) => finite(p.step))
      .map((p) => ({ step: p.step, accuracy: orNull(p.accuracy), loss: orNull(p.loss) }));
    if (m.schedule && finite(m.schedule.total_steps)) this.schedule = scheduleOf(m.schedule);
    this.thin();
    this.version += 1;
  }

  // A progress event: a point when it reports a training step. A step before the last one
  // means the job resumed from a checkpoint and runs those steps again: what came after it
  // goes, as in the server's history (bitcore.train.history). True when the curves changed.
  addProgress(p) {
    if (!p || p.phase !== "training" || !finite(p.step)) return false;
    const point = pointOf(p);
    const last = this.training[this.training.length - 1];
    if (last && point.step === last.step && point.loss === last.loss && point.lr === last.lr) {
      if (point.ips !== null) last.ips = point.ips; // the same step reported again
      return false;
    }
    if (last && point.step <= last.step) {
      this.training = this.training.filter((q) => q.step < point.step);
      this.validation = this.validation.filter((q) => q.step < point.step);
    }
    this.training.push(point);
    this.thin();
    this.version += 1;
    return true;
  }

  // Past CURVE_MAX_POINTS, every other point goes (the first and the last always stay).
  thin() {
    while (this.training.length > CURVE_MAX_POINTS) {
      const last = this.training[this.training.length - 1];
      this.training = this.training.filter((_, i) => i % 2 === 0);
      if (this.training[this.training.length - 1] !== last) this.training.push(last);
    }
  }

  // The last non-zero training images/s (null: none yet).
  get rate() {
    for (let i = this.training.length - 1; i >= 0; i -= 1) {
      if (this.training[i].ips !== null) return this.training[i].ips;
    }
    return null;
  }

  // The images/s to show for a progress report: its own, or once training is over (the
  // evaluating and done reports carry 0) the last rate training had; null when unknown.
  rateFor(p) {
    if (!p) return null;
    if (finite(p.images_per_second) && p.images_per_second > 0) return p.images_per_second;
    if (trainingOver(p)) return this.rate;
    return finite(p.images_per_second) ? p.images_per_second : null;
  }

  // Likewise the learning rate: evaluating and done report 0, training's last one is shown.
  lrFor(p) {
    if (!p) return null;
    if (trainingOver(p)) {
      const last = this.training[this.training.length - 1];
      return last ? last.lr : null;
    }
    return orNull(p.lr);
  }

  // uPlot's aligned columns: the steps of both histories, and null where a series has none.
  columns() {
    const steps = [...new Set([...this.training, ...this.validation].map((p) => p.step))].sort((a, b) => a - b);
    const at = (points, key) => {
      const byStep = new Map(points.map((p) => [p.step, p[key]]));
      return steps.map((s) => (byStep.has(s) ? byStep.get(s) : null));
    };
    return {
      steps,
      loss: at(this.training, "loss"),
      lr: at(this.training, "lr"),
      valLoss: at(this.validation, "loss"),
      valAccuracy: at(this.validation, "accuracy"),
    };
  }

  // The vertical lines: where warm-up ends and where the learning rate drops ÷10.
  markers() {
    const s = this.schedule;
    if (!s) return [];
    const out = s.warmup_steps > 0 ? [{ step: s.warmup_steps, label: "warm-up ends" }] : [];
    for (const step of s.decay_steps) out.push({ step, label: "lr ÷10" });
    return out;
  }

  // The charts in words (their caption, and what a screen reader gets).
  describe() {
    const parts = [];
    const last = this.training[this.training.length - 1];
    const total = this.schedule ? this.schedule.total_steps : null;
    if (last) {
      const lr = finite(last.lr) ? `, learning rate ${lrText(last.lr)}` : "";
      const loss = finite(last.loss) ? last.loss.toFixed(4) : "– (diverged)";
      parts.push(`Step ${last.step}${total ? ` of ${total}` : ""}: training loss ${loss}${lr}.`);
    } else {
      parts.push("No training step yet.");
    }
    if (this.schedule) {
      const s = this.schedule;
      const warm = s.warmup_steps > 0 ? `Warm-up ends at step ${s.warmup_steps}` : "No warm-up";
      const drops = s.decay_steps.length ? `the learning rate drops ÷10 at step ${s.decay_steps.join(", ")}` : "no learning-rate drops";
      parts.push(`${warm}; ${drops}.`);
    }
    const v = this.validation[this.validation.length - 1];
    if (v) {
      const acc = finite(v.accuracy) ? `accuracy ${(100 * v.accuracy).toFixed(1)}%` : "";
      const loss = finite(v.loss) ? `loss ${v.loss.toFixed(4)}` : "";
      parts.push(`Validation at step ${v.step}: ${[acc, loss].filter(Boolean).join(", ")}.`);
    }
    return parts.join(" ");
  }
}

const orNull = (v) => (finite(v) ? v : null);

// A training point from a progress report or the history: a rate of 0 is no rate.
function pointOf(p) {
  const ips = finite(p.images_per_second) && p.images_per_second > 0 ? p.images_per_second : null;
  return { step: p.step, loss: orNull(p.loss), lr: orNull(p.lr), ips };
}

function trainingOver(p) {
  return p.phase === "evaluating" || p.phase === "done";
}

function scheduleOf(s) {
  return {
    warmup_steps: finite(s.warmup_steps) ? s.warmup_steps : 0,
    decay_steps: Array.isArray(s.decay_steps) ? s.decay_steps.filter(finite) : [],
    total_steps: s.total_steps,
  };
}

if (typeof module !== "undefined" && module.exports) {
  module.exports = { CurveStore, CURVE_MAX_POINTS, lrText };
}

// -- drawing (uPlot) -------------------------------------------------------------------------------

// Two small charts sharing the step axis (and the cursor): loss with the validation points, and
// the learning rate. `target`: the element they go in; `summary`: the <p> that says them in words.
class TrainingCurves {
  constructor(target, summary) {
    this.target = target;
    this.summary = summary;
    this.plots = [];
    this.store = null;
    this.drawn = -1; // the store version on screen
  }

  draw(store) {
    if (store !== this.store) {
      this.clear();
      this.store = store;
    }
    if (store.version === this.drawn && this.plots.length) return;
    this.drawn = store.version;
    const c = store.columns();
    const loss = [c.steps, c.loss, c.valLoss, c.valAccuracy];
    const lr = [c.steps, c.lr];
    if (!this.plots.length) {
      const look = this.look();
      const width = this.width();
      const lossBox = document.createElement("div");
      const lrBox = document.createElement("div");
      lossBox.className = "curve";
      lrBox.className = "curve";
      this.target.replaceChildren(lossBox, lrBox);
      this.plots = [
        new uPlot(lossOptions(store, look, width), loss, lossBox),
        new uPlot(lrOptions(store, look, width), lr, lrBox),
      ];
    } else {
      this.plots[0].setData(loss);
      this.plots[1].setData(lr);
    }
    this.summary.textContent = store.describe();
  }

  resize() {
    const width = this.width();
    for (const plot of this.plots) plot.setSize({ width, height: CHART_HEIGHT });
  }

  clear() {
    for (const plot of this.plots) plot.destroy();
    this.plots = [];
    this.store = null;
    this.drawn = -1;
    this.target.replaceChildren();
    this.summary.textContent = "";
  }

  width() {
    return Math.max(280, Math.min(900, (this.target.clientWidth || 640) - 8));
  }

  // Colours from the page's own (light or dark) theme.
  look() {
    const css = window.getComputedStyle(this.target);
    const pick = (name, fallback) => (css.getPropertyValue(name) || "").trim() || fallback;
    return {
      fg: pick("--fg", "#1b1f24"),
      grid: pick("--border", "#d0d7de"),
      accent: pick("--accent", "#0b5cad"),
      second: pick("--chart-2", "#b35900"),
      third: pick("--chart-3", "#1a7f37"),
    };
  }
}

const CHART_HEIGHT = 200;
const CURSOR_SYNC = "bitserve-job-curves";

// The x scale runs from 0 to the planned last step, so the chart shows how far the job is.
function stepRange(store) {
  return (_u, _min, max) => [0, Math.max(store.schedule ? store.schedule.total_steps : 0, finite(max) ? max : 0, 1)];
}

function stepAxis(look) {
  return { label: "step", stroke: look.fg, grid: { stroke: look.grid, width: 1 }, ticks: { stroke: look.grid } };
}

function lossOptions(store, look, width) {
  const dots = (color) => ({ stroke: color, paths: () => null, points: { show: true, size: 9, fill: color } });
  return {
    title: "Loss",
    width,
    height: CHART_HEIGHT,
    cursor: { sync: { key: CURSOR_SYNC } },
    scales: { x: { time: false, range: stepRange(store) }, acc: { range: [0, 1] } },
    axes: [
      stepAxis(look),
      { label: "loss", stroke: look.fg, grid: { stroke: look.grid, width: 1 }, ticks: { stroke: look.grid } },
      {
        scale: "acc",
        side: 1,
        label: "validation accuracy",
        stroke: look.fg,
        grid: { show: false },
        values: (_u, ticks) => ticks.map((t) => `${Math.round(100 * t)}%`),
      },
    ],
    series: [
      { label: "step" },
      { label: "training loss", stroke: look.accent, width: 2, spanGaps: true, points: { show: false } },
      { label: "validation loss", ...dots(look.second) },
      {
        label: "validation accuracy",
        scale: "acc",
        value: (_u, v) => (finite(v) ? `${(100 * v).toFixed(1)}%` : "–"),
        ...dots(look.third),
      },
    ],
    plugins: [markerLines(store, look)],
  };
}

function lrOptions(store, look, width) {
  return {
    title: "Learning rate",
    width,
    height: CHART_HEIGHT,
    cursor: { sync: { key: CURSOR_SYNC } },
    scales: { x: { time: false, range: stepRange(store) } },
    axes: [
      stepAxis(look),
      {
        label: "learning rate",
        stroke: look.fg,
        size: 64,
        grid: { stroke: look.grid, width: 1 },
        ticks: { stroke: look.grid },
        values: (_u, ticks) => ticks.map((t) => lrText(t, 2)),
      },
    ],
    series: [
      { label: "step" },
      {
        label: "learning rate",
        stroke: look.accent,
        width: 2,
        spanGaps: true,
        points: { show: false },
        value: (_u, v) => lrText(v),
      },
    ],
    plugins: [markerLines(store, look)],
  };
}

// Dashed vertical lines at the store's markers, labelled at the top, drawn on uPlot's canvas
// after each redraw (a canvas, not an element: nothing for the CSP to object to).
function markerLines(store, look) {
  return {
    hooks: {
      draw: [
        (u) => {
          const ratio = uPlot.pxRatio || 1;
          const { left, top, width, height } = u.bbox;
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = look.fg;
          ctx.fillStyle = look.fg;
          ctx.globalAlpha = 0.75;
          ctx.lineWidth = ratio;
          ctx.setLineDash([4 * ratio, 4 * ratio]);
          ctx.font = `${11 * ratio}px system-ui, sans-serif`;
          for (const m of store.markers()) {
            const x = Math.round(u.valToPos(m.step, "x", true));
            if (x < left || x > left + width) continue;
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            ctx.fillText(m.label, x + 3 * ratio, top + 12 * ratio);
          }
          ctx.restore();
        },
      ],
    },
  };
}
