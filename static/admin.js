// Run page charts: metrics over steps from /admin/runs/<id>/metrics.json, one chart per group the
// server chose (reward, KL, length, accuracy, losses, then any other metric on its own). While the run
// is active the data is fetched again every few seconds; polling stops once the run has ended.
(function () {
  "use strict";
  const root = document.getElementById("charts");
  if (!root || !window.Chart) return;
  const url = root.dataset.metricsUrl;
  const charts = new Map();
  let live = root.dataset.live === "true";

  function datasets(names, series) {
    return names.map((name) => ({
      label: name,
      data: series[name].map(([x, y]) => ({ x, y })),
      spanGaps: true,
      borderWidth: 1.5,
      pointRadius: series[name].length > 60 ? 0 : 2,
    }));
  }

  function draw(body) {
    if (body.charts.length) {
      const empty = root.querySelector(".charts-empty");
      if (empty) empty.remove();
    }
    for (const group of body.charts) {
      const data = datasets(group.names, body.series);
      const existing = charts.get(group.title);
      if (existing) {
        existing.data.datasets = data;
        existing.update("none");
        continue;
      }
      const figure = document.createElement("figure");
      figure.className = "chart";
      const caption = document.createElement("figcaption");
      caption.textContent = group.title;
      const box = document.createElement("div");
      box.className = "chart-box";
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${group.title} over training steps`);
      box.appendChild(canvas);
      figure.append(caption, box);
      root.appendChild(figure);
      charts.set(
        group.title,
        new window.Chart(canvas, {
          type: "line",
          data: { datasets: data },
          options: {
            animation: false,
            responsive: true,
            maintainAspectRatio: false,
            interaction: { mode: "nearest", intersect: false },
            scales: { x: { type: "linear", title: { display: true, text: "step" } } },
            plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
          },
        }),
      );
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

  refresh();
})();
