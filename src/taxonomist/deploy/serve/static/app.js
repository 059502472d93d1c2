// The page for biologists: send each chosen or dropped image to POST /predict and show the answer.
// Plain browser JavaScript, no library and no request to any other host.
(function () {
  "use strict";
  var PARALLEL = 4;              // requests in flight at once; the server batches them together
  var token = sessionStorage.getItem("taxonomist-token") || "";
  var queue = [], running = 0, pending = [];
  var $ = function (id) { return document.getElementById(id); };

  function headers() { return token ? { "Authorization": "Bearer " + token } : {}; }

  function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%"; }

  function setStatus(text) { $("status").textContent = text; }

  function describeModel() {
    fetch("/health").then(function (r) { return r.json(); }).then(function (h) {
      $("model").textContent = "Model " + h.model + " · decision rule: " + h.decision;
    }).catch(function () { $("model").textContent = "The service does not answer."; });
  }

  function card(file) {
    var node = $("card-template").content.firstElementChild.cloneNode(true);
    var img = node.querySelector("img");
    img.src = URL.createObjectURL(file);
    img.alt = "Uploaded image " + file.name;
    node.querySelector(".filename").textContent = file.name;
    node.querySelector(".decision").textContent = "identifying…";
    node.setAttribute("aria-busy", "true");
    $("results").prepend(node);
    return node;
  }

  function showError(node, message) {
    node.classList.add("error");
    node.removeAttribute("aria-busy");
    node.querySelector(".decision").textContent = "Not identified";
    node.querySelector(".confidence").textContent = message;
    node.querySelectorAll("h3").forEach(function (h) { h.hidden = true; });
  }

  function showAnswer(node, a) {
    node.removeAttribute("aria-busy");
    node.classList.add("done");
    node.querySelector(".decision").textContent = a.decision;
    node.querySelector(".rank").textContent = a.rank ? "(" + a.rank + ")" : "";
    node.querySelector(".confidence").textContent = "Probability that the organism is " + a.decision +
      " or lies below it: " + pct(a.confidence);
    var body = node.querySelector(".lineage tbody");
    Object.keys(a.lineage).forEach(function (level) {
      var item = a.lineage[level];
      var row = document.createElement("tr");
      var th = document.createElement("th"); th.scope = "row"; th.textContent = level;
      var name = document.createElement("td"); name.className = "name"; name.textContent = item.name; name.title = item.name;
      var cell = document.createElement("td");
      var bar = document.createElement("div"); bar.className = "bar";
      bar.setAttribute("role", "meter"); bar.setAttribute("aria-valuemin", "0"); bar.setAttribute("aria-valuemax", "1");
      bar.setAttribute("aria-valuenow", String(item.p));
      bar.setAttribute("aria-label", "probability of " + item.name + ": " + pct(item.p));
      var fill = document.createElement("span"); fill.style.width = (100 * item.p).toFixed(1) + "%";
      var label = document.createElement("td"); label.className = "pct"; label.textContent = pct(item.p);
      bar.appendChild(fill); cell.appendChild(bar); cell.className = "bar-cell";
      row.appendChild(th); row.appendChild(name); row.appendChild(cell); row.appendChild(label); body.appendChild(row);
    });
    var top = node.querySelector(".top");
    a.top.forEach(function (t) {
      var li = document.createElement("li");
      var name = document.createElement("span"); name.textContent = t.name + " ";
      var p = document.createElement("span"); p.className = "p"; p.textContent = pct(t.p);
      li.appendChild(name); li.appendChild(p); top.appendChild(li);
    });
    if (a.ood) {
      node.querySelector(".unknown").hidden = !a.ood.unknown;
      node.querySelector(".ood").textContent = "Out-of-distribution score (" + a.ood.method + "): " +
        a.ood.score.toFixed(3) + (a.ood.unknown ? " — above the threshold: possibly a taxon the model does not know" : "");
    }
  }

  function send(job) {
    var form = new FormData();
    form.append("file", job.file, job.file.name);
    running += 1;
    fetch("/predict", { method: "POST", body: form, headers: headers() }).then(function (r) {
      return r.json().catch(function () { return { error: "HTTP " + r.status }; }).then(function (body) {
        if (r.status === 401) { pending.push(job); $("token-form").hidden = false; $("token").focus(); return; }
        if (!r.ok) { showError(job.node, body.error || ("HTTP " + r.status)); return; }
        showAnswer(job.node, body.predictions[0]);
      });
    }).catch(function (e) { showError(job.node, "The service did not answer: " + e.message); })
      .then(function () { running -= 1; pump(); });
  }

  function pump() {
    while (running < PARALLEL && queue.length) { send(queue.shift()); }
    var waiting = queue.length + running;
    setStatus(waiting ? waiting + " image(s) being identified…" : "");
  }

  function add(files) {
    Array.prototype.forEach.call(files, function (file) {
      queue.push({ file: file, node: card(file) });
    });
    pump();
  }

  $("files").addEventListener("change", function (e) { add(e.target.files); e.target.value = ""; });
  var drop = $("drop");
  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (type) {
    drop.addEventListener(type, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) { if (e.dataTransfer && e.dataTransfer.files.length) { add(e.dataTransfer.files); } });
  drop.addEventListener("click", function (e) { if (e.target === drop || e.target.tagName === "P" || e.target.tagName === "STRONG") { $("files").click(); } });
  $("token-form").addEventListener("submit", function (e) {
    e.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("taxonomist-token", token);
    $("token-form").hidden = true;
    queue = pending.concat(queue); pending = [];
    pump();
  });
  describeModel();
}());
