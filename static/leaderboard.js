// The policy leaderboard's chart: ratings with their bootstrap intervals, from the JSON the page
// embeds in #leaderboard-data (a data block, never run as script).
(function () {
  const source = document.getElementById("leaderboard-data");
  const canvas = document.getElementById("leaderboard-chart");
  if (!source || !canvas) return;
  const data = JSON.parse(source.textContent);
  // The interval is a floating bar from low to high; the rating is a point on it.
  new Chart(canvas, {
    type: "bar",
    data: {
      labels: data.labels,
      datasets: [
        { type: "bar", label: "95% interval", data: data.intervals, backgroundColor: "rgba(58, 91, 217, 0.25)",
          borderColor: "rgba(58, 91, 217, 0.8)", borderWidth: 1, barPercentage: 0.25 },
        { type: "line", label: "Rating (Elo)", data: data.ratings, showLine: false, pointRadius: 6,
          pointBackgroundColor: "#1d2330" }
      ]
    },
    options: {
      maintainAspectRatio: false,
      scales: { y: { beginAtZero: false, grace: "5%", title: { display: true, text: "Elo" } } },
      plugins: { tooltip: { callbacks: { label: (ctx) => Array.isArray(ctx.raw)
        ? `interval ${ctx.raw[0]} – ${ctx.raw[1]}` : `rating ${ctx.raw}` } } }
    }
  });
})();
