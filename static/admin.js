// Admin console behaviour, loaded by its pages as a file (no inline script or handler).
//
// 1. Forms with data-confirm ask before they submit (cancel a run or round, promote, roll back).
// 2. Run page charts: metrics over steps from /admin/runs/<id>/metrics.json, one chart per panel the
//    server laid out (a second y axis on the right for a series of another size), metric names in
//    words, numbers printed readably (1.1e-5, not 1.100000E-5). While the run is active the data is
//    fetched again every few seconds; polling stops once the run has ended.
(function () {
  "use strict";
  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });
})();

(function () {
  "use strict";
  const root = document.getElementById("charts");
  if (!root || !window.Chart) return;
  const url = root.dataset.metricsUrl;
  const charts = new Map();
  let live = root.dataset.live === "true";

  // 0.000011 → "1.1e-5", 0.0000112 → "1.12e-5", 12345678 → "1.23e+7", 0.1234 → "0.123", 41 → "41".
  function readable(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
    if (value === 0) return "0";
    const size = Math.abs(value);
    if (size < 1e-3 || size >= 1e6) return value.toExponential(2).replace(/\.?0+e/, "e");
    return String(Number(value.toPrecision(3)));
  }

  function datasets(group, body) {
    return group.names.map((name) => ({
      label: body.labels[name] || name,
      data: body.series[name].map(([x, y]) => ({ x, y })),
      yAxisID: group.axes[name] || "y",
      spanGaps: true,
      borderWidth: 1.5,
      pointRadius: body.series[name].length > 60 ? 0 : 2,
    }));
  }

  function axisTitle(group, body, axis) {
    const names = group.names.filter((n) => (group.axes[n] || "y") === axis);
    return names.length === 1 ? body.labels[names[0]] || names[0] : "";
  }

  function options(group, body) {
    const twoAxes = Object.values(group.axes).includes("y1");
    const scales = {
      x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
      y: { ticks: { callback: readable }, title: { display: twoAxes, text: axisTitle(group, body, "y") } },
    };
    if (twoAxes) {
      scales.y1 = {
        position: "right",
        grid: { drawOnChartArea: false },
        ticks: { callback: readable },
        title: { display: true, text: axisTitle(group, body, "y1") },
      };
    }
    return {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "nearest", intersect: false },
      scales,
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${readable(ctx.parsed.y)}` } },
      },
    };
  }

  function draw(body) {
    if (body.charts.length) {
      const empty = root.querySelector(".charts-empty");
      if (empty) empty.remove();
    }
    for (const group of body.charts) {
      const data = datasets(group, body);
      const existing = charts.get(group.title);
      if (existing) {
        existing.data.datasets = data;
        existing.options = options(group, body);
        existing.update("none");
        continue;
      }
      const figure = document.createElement("figure");
      figure.className = "chart";
      figure.dataset.chart = group.title;
      const caption = document.createElement("figcaption");
      caption.textContent = group.label || group.title;
      const box = document.createElement("div");
      box.className = "chart-box";
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute(
        "aria-label",
        `${group.label || group.title} over training steps: ${data.map((d) => d.label).join(", ")}`,
      );
      box.appendChild(canvas);
      figure.append(caption, box);
      root.appendChild(figure);
      charts.set(group.title, new window.Chart(canvas, { type: "line", data: { datasets: data }, options: options(group, body) }));
    }
  }

  async function refresh() {
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok) {
        const body = await response.json();
        draw(body);
        live = !body.finished;
      }
    } catch (_) {
      // keep the charts drawn so far and try again
    }
    if (live) setTimeout(refresh, 3000);
  }

  window.prefloopReadable = readable; // for the browser tests
  refresh();
})();
