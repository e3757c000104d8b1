// gradsentry dashboard: draws the figures the collector builds (dashboards/figures.py) and
// keeps them live by polling. Alerts and noise scale come from their own REST endpoints;
// where the collector has none (FEATURES), the panel says so instead of failing.
"use strict";

const GS = (() => {
  const CONFIG = {displaylogo: false, responsive: true};

  async function getJSON(url, opts) {
    const r = await fetch(url, opts);
    if (r.status === 401) {  // the sign-in cookie is gone or its token was revoked
      location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    }
    if (!r.ok) {
      const err = new Error(`${url}: HTTP ${r.status}`);
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  // Wire numbers: "NaN", "Infinity", "-Infinity" are strings in JSON.
  const num = v => (typeof v === "string" ? Number(v) : v);

  function note(id, text) {
    const el = document.getElementById(id);
    if (el.data) Plotly.purge(el);
    el.classList.add("empty");
    el.innerHTML = `<p class="note"></p>`;
    el.firstChild.textContent = text;
  }

  function draw(id, fig, emptyText) {
    const el = document.getElementById(id);
    if (!fig) { note(id, emptyText || "no data yet"); return el; }
    if (el.classList.contains("empty")) { el.classList.remove("empty"); el.innerHTML = ""; }
    if (fig.layout.height) el.style.height = `${fig.layout.height}px`;
    Plotly.react(el, fig.data, fig.layout, CONFIG);
    return el;
  }

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  // Calls fn now and then every ms milliseconds (after the previous call finished).
  function every(ms, fn) {
    const tick = async () => {
      try { await fn(); setText("live", `live · updated ${new Date().toLocaleTimeString()}`); }
      catch (e) { setText("live", `live · ${e.message}; retrying`); }
      setTimeout(tick, ms);
    };
    return tick();
  }

  function alertMarkers(fig, alerts) {
    const shapes = [], annotations = [];
    for (const a of alerts) {
      const colour = a.severity === "critical" ? "#e03131" : "#e67700";
      shapes.push({type: "line", x0: a.step, x1: a.step, yref: "paper", y0: 0, y1: 1,
                   line: {color: colour, width: 1.5, dash: a.state === "firing" ? "solid" : "dot"}});
      annotations.push({x: a.step, yref: "paper", y: 1, text: "⚠", showarrow: false,
                        hovertext: `${a.rule} (${a.scope}): ${a.summary}`, font: {color: colour}});
    }
    fig.layout.shapes = shapes;
    fig.layout.annotations = annotations;
  }

  async function runAlerts(run) {
    if (!FEATURES.alerts) return null;
    try {
      return (await getJSON(`/api/v1/runs/${encodeURIComponent(run)}/alerts?state=all`)).alerts;
    } catch (e) {
      if (e.status === 404) return null;
      throw e;
    }
  }

  async function drawNoise(run, batchSize) {
    const text = "noise scale is not available on this collector";
    if (!FEATURES.noise) { note("noise", text); return; }
    let ns;
    try {
      ns = await getJSON(`/api/v1/runs/${encodeURIComponent(run)}/noise-scale`);
    } catch (e) {
      if (e.status === 404) { note("noise", text); return; }
      throw e;
    }
    const s = ns.series || {};
    if (!s.step || !s.step.length) { note("noise", "no noise-scale estimate yet"); return; }
    const y = k => (s[k] || []).map(v => (v === null ? null : num(v)));
    const c = ns.current || {};
    const title = c.defined
      ? `B_simple ≈ ${Number(c.b_simple).toPrecision(3)} [${Number(c.lo).toPrecision(3)}, ${Number(c.hi).toPrecision(3)}]`
      : `B_simple not defined yet${c.reason ? ": " + c.reason : ""}`;
    const bs = ns.batch_size ?? batchSize;
    const data = [
      {type: "scatter", mode: "lines", x: s.step, y: y("lo"), line: {width: 0}, showlegend: false, hoverinfo: "skip"},
      {type: "scatter", mode: "lines", x: s.step, y: y("hi"), fill: "tonexty", line: {width: 0},
       fillcolor: "#2355c433", name: "interval"},
      {type: "scatter", mode: "lines", x: s.step, y: y("b_simple"), name: "B_simple (critical batch size)",
       line: {color: "#2355c4"}},
    ];
    const shapes = bs ? [{type: "line", xref: "paper", x0: 0, x1: 1, y0: bs, y1: bs,
                          line: {color: "#2b8a3e", dash: "dash"}}] : [];
    draw("noise", {data, layout: {title: {text: title + (bs ? ` · batch size ${bs}` : ""), x: 0.01, font: {size: 15}},
      margin: {l: 60, r: 20, t: 40, b: 40}, yaxis: {type: "log"}, xaxis: {title: {text: "step"}},
      shapes, legend: {orientation: "h", y: -0.2}}});
  }

  function runPage(run, batchSize, pollMs) {
    const base = `/runs/${encodeURIComponent(run)}`;
    let loaded = false, shown = null, layer = null, clickBound = false;

    async function showLayer(name) {
      layer = name;
      const fig = await getJSON(`${base}/layer.json?name=${encodeURIComponent(name)}`);
      setText("layer-detail-name", `layer ${name}`);
      draw("layer-detail", fig);
    }

    async function refresh() {
      const [figs, alerts] = await Promise.all([getJSON(`${base}/figures.json`), runAlerts(run)]);
      if (alerts) { alertMarkers(figs.figures.loss, alerts); alertMarkers(figs.figures.grad_norm, alerts); }
      draw("loss", figs.figures.loss);
      draw("grad_norm", figs.figures.grad_norm);
      const heat = draw("heatmap", figs.figures.heatmap, "no per-layer data yet");
      if (figs.figures.heatmap && !clickBound) {
        heat.on("plotly_click", ev => { if (ev.points.length) showLayer(ev.points[0].y); });
        clickBound = true;
      }
      draw("lr", figs.figures.lr, "no learning rate reported");
      draw("nonfinite", figs.figures.nonfinite);
      draw("update_ratio", figs.figures.update_ratio,
           "no update-to-weight ratio yet (reported every param_every steps)");
      await drawNoise(run, batchSize);
      if (layer) await showLayer(layer);
      shown = figs.run.last_step;
      loaded = true;
      setText("last-step", shown ?? "–");
      if (figs.run.num_steps != null) setText("num-steps", figs.run.num_steps);
      setText("status", figs.run.status);
    }

    return every(pollMs, async () => {
      if (!loaded) { await refresh(); return; }
      const r = await getJSON(`/api/v1/runs/${encodeURIComponent(run)}`);
      if (r.last_step !== shown) await refresh();
    });
  }

  function comparePage(runs, names, pollMs) {
    const q = `runs=${runs.map(encodeURIComponent).join(",")}&names=${names.join(",")}`;
    let last = null;
    return every(pollMs, async () => {
      const states = await Promise.all(runs.map(r => getJSON(`/api/v1/runs/${encodeURIComponent(r)}`)));
      const key = states.map(s => s.last_step).join(",");
      if (key === last) return;
      const figs = await getJSON(`/compare/figures.json?${q}`);
      for (const n of names) draw(`cmp-${n}`, figs.figures[n]);
      last = key;
    });
  }

  function indexPage() {
    const picks = [...document.querySelectorAll("input.pick")];
    const button = document.getElementById("compare");
    const chosen = () => picks.filter(p => p.checked).map(p => p.value);
    picks.forEach(p => p.addEventListener("change", () => { button.disabled = chosen().length < 2; }));
    button.addEventListener("click", () => {
      location.href = `/compare?runs=${chosen().map(encodeURIComponent).join(",")}`;
    });
    return every(5000, async () => {
      const runs = await getJSON("/api/v1/runs?limit=1000");
      for (const r of runs) {
        const row = document.querySelector(`tr[data-run="${CSS.escape(r.id)}"]`);
        if (!row) continue;
        row.querySelector(".status").textContent = r.status;
        row.querySelector(".last-step").textContent = r.last_step ?? "–";
      }
      if (!FEATURES.alerts) return;
      const firing = (await getJSON("/api/v1/alerts?state=firing&limit=1000")).alerts;
      const counts = {};
      for (const a of firing) counts[a.run] = (counts[a.run] || 0) + 1;
      document.querySelectorAll("tr[data-run]").forEach(row => {
        const n = counts[row.dataset.run] || 0;
        row.querySelector(".firing").innerHTML = n ? `<span class="pill firing">${n}</span>` : "0";
      });
    });
  }

  function alertsPage() {
    if (!FEATURES.alerts) return;
    const tbody = document.querySelector("#alerts tbody");
    const cell = (tr, text) => { const td = tr.insertCell(); td.textContent = text ?? "–"; return td; };
    async function load() {
      const state = document.getElementById("state").value;
      const project = document.getElementById("project").value.trim();
      const qs = new URLSearchParams({state, limit: "500"});
      if (project) qs.set("project", project);
      const alerts = (await getJSON(`/api/v1/alerts?${qs}`)).alerts;
      tbody.innerHTML = "";
      document.getElementById("alerts-empty").hidden = alerts.length > 0;
      for (const a of alerts) {
        const tr = tbody.insertRow();
        tr.dataset.alert = a.id;
        cell(tr, "").innerHTML = `<span class="pill ${a.state}">${a.state}${a.silenced ? " · silenced" : ""}</span>`;
        cell(tr, "").innerHTML = `<span class="pill ${a.severity}">${a.severity}</span>`;
        cell(tr, "").innerHTML = `<a href="/runs/${encodeURIComponent(a.run)}">${a.run}</a>`;
        cell(tr, a.rule); cell(tr, a.scope); cell(tr, a.step); cell(tr, a.summary);
        cell(tr, a.first_layer ? `${a.first_layer} (${a.first_layer_lead_steps ?? 0} steps ahead)` : null);
        cell(tr, new Date(a.starts_at).toLocaleString());
        cell(tr, a.acknowledged_at ? `by ${a.acknowledged_by || "someone"}` : null);
        const td = tr.insertCell();
        if (!a.acknowledged_at) {
          const b = document.createElement("button");
          b.textContent = "acknowledge"; b.className = "ack";
          b.onclick = async () => {
            await getJSON(`/api/v1/alerts/${a.id}/ack`, {method: "POST",
              headers: {"Content-Type": "application/json"}, body: JSON.stringify({by: "dashboard", comment: null})});
            await load();
          };
          td.appendChild(b);
        }
      }
      await loadSilences();
    }
    async function loadSilences() {
      const body = document.querySelector("#silences tbody");
      const data = await getJSON("/api/v1/silences");
      const list = Array.isArray(data) ? data : (data.silences || []);
      body.innerHTML = "";
      for (const s of list) {
        const tr = body.insertRow();
        cell(tr, s.id); cell(tr, s.project); cell(tr, s.run); cell(tr, s.rule);
        cell(tr, s.step_from != null || s.step_to != null ? `${s.step_from ?? ""}–${s.step_to ?? ""}` : null);
        cell(tr, s.ends_at); cell(tr, s.comment);
        const b = document.createElement("button");
        b.textContent = "expire";
        b.onclick = async () => { await fetch(`/api/v1/silences/${s.id}`, {method: "DELETE"}); await load(); };
        tr.insertCell().appendChild(b);
      }
    }
    document.getElementById("state").onchange = load;
    document.getElementById("project").onchange = load;
    document.getElementById("silence-form").onsubmit = async ev => {
      ev.preventDefault();
      const f = new FormData(ev.target);
      const v = k => (f.get(k) || "").trim() || null;
      const int = k => (v(k) === null ? null : Number(v(k)));
      await getJSON("/api/v1/silences", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({project: v("project"), run: v("run"), rule: v("rule"), starts_at: null,
          ends_at: v("ends_at") ? new Date(v("ends_at")).toISOString() : null,
          step_from: int("step_from"), step_to: int("step_to"), comment: v("comment") || "",
          created_by: "dashboard"})});
      ev.target.reset();
      await load();
    };
    return every(10000, load);
  }

  return {getJSON, draw, note, runPage, comparePage, indexPage, alertsPage};
})();
