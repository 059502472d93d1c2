// The page for biologists: send each chosen or dropped image to POST /predict and show the answer. With
// "mark the organism with a box" (always on for two-stream models) a dropped image is a whole frame: the user
// drags a rectangle on it and the box goes along as bbox=x,y,w,h. Plain browser JavaScript, no library and no
// request to any other host.
(function () {
  "use strict";
  var PARALLEL = 4;              // requests in flight at once; the server batches them together
  var FRAME_MAX = { width: 720, height: 480 };   // displayed frame size at most, in CSS pixels
  var Box = window.TaxonomistBox;
  var token = sessionStorage.getItem("taxonomist-token") || "";
  var queue = [], running = 0, pending = [];
  var inputs = { two_stream: false, bbox: "optional" };
  var $ = function (id) { return document.getElementById(id); };

  function headers() { return token ? { "Authorization": "Bearer " + token } : {}; }

  function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%"; }

  function setStatus(text) { $("status").textContent = text; }

  // /health says whether the model is two-stream (a box on the whole frame is then required) and at which
  // context scale the service cuts the surroundings of the box.
  var ready = fetch("/health").then(function (r) { return r.json(); }).then(function (h) {
    var text = "Model " + h.model + " · decision rule: " + h.decision;
    if (h.inputs) {
      inputs = h.inputs;
      if (inputs.two_stream) {
        text += " · looks at the organism and its surroundings (" +
          (inputs.context_scale === "full" ? "the whole frame" : inputs.context_scale ? inputs.context_scale +
           "× the box" : "context scale unknown") + "): draw a box around it on the whole frame";
      }
    }
    $("model").textContent = text;
    if (h.priors) {   // started with --priors: the images' context reweights the answers
      $("context-line").hidden = false;
      var list = $("contexts");
      h.priors.contexts.forEach(function (c) { var o = document.createElement("option"); o.value = c; list.appendChild(o); });
      $("context-help").textContent = "The species lists of " + h.priors.file + " reweight the answers by where " +
        "the images were taken (" + h.priors.contexts.length + " contexts; join several keys with ;). Leave it " +
        "empty to identify from the images alone.";
    }
    var use = $("use-box");
    use.checked = use.checked || inputs.bbox === "required";
    use.disabled = inputs.bbox === "required";
    $("box-help").textContent = inputs.bbox === "required" ?
      "This model needs the box: drop whole frames, then drag a rectangle around each organism." :
      "Drop whole frames, then drag a rectangle around each organism; without a box the whole image is identified.";
  }).catch(function () { $("model").textContent = "The service does not answer."; });

  function card(file, boxed) {
    var node = $("card-template").content.firstElementChild.cloneNode(true);
    var img = node.querySelector("img");
    img.src = boxed ? boxed.thumbnail : URL.createObjectURL(file);
    img.alt = boxed ? "The boxed part of " + file.name : "Uploaded image " + file.name;
    node.querySelector(".filename").textContent = file.name + (boxed ? " · box " + Box.format(boxed.box) : "");
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
    if (a.bbox) { node.setAttribute("data-bbox", a.bbox.join(",")); }
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
    if (a.priors) {
      node.querySelector(".priors").textContent = !a.priors.applied ?
        "Context " + (a.priors.context ? "“" + a.priors.context + "” is not in the priors file" : "not given") +
        ": identified from the image alone." :
        "Reweighted by the context “" + a.priors.context + "”. " + (a.raw.decision === a.decision ?
          "Without it the answer is the same." :
          "Without it: " + a.raw.decision + " (" + pct(a.raw.confidence) + ").");
    }
    if (a.ood) {
      node.querySelector(".unknown").hidden = !a.ood.unknown;
      // scores live on very different scales (ODIN near −1/L, Mahalanobis in the millions): 4 significant digits
      node.querySelector(".ood").textContent = "Unknown-taxon check (" + a.ood.method + "): score " +
        Number(a.ood.score.toPrecision(4)) + ", threshold " + Number(a.ood.threshold.toPrecision(4)) +
        (a.ood.unknown ? " — at or above it: possibly a taxon the model does not know" :
         " — below it: like the taxa the model was trained on");
    }
  }

  function send(job) {
    var form = new FormData();
    form.append("file", job.file, job.file.name);
    if (job.box) { form.append("bbox", Box.format(job.box)); }
    var context = $("context").value.trim();
    if (!$("context-line").hidden && context) { form.append("context", context); }
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

  // A whole frame on a canvas: drag a rectangle (pointer events; the box can also be typed), then identify it.
  // Several boxes can be sent from one frame, one organism each.
  function frameEditor(file) {
    var node = $("frame-template").content.firstElementChild.cloneNode(true);
    var canvas = node.querySelector("canvas"), field = node.querySelector(".box-field");
    var button = node.querySelector(".identify"), ctx = canvas.getContext("2d");
    var image = new Image(), scale = 1, box = null, drag = null, before = null;
    node.querySelector(".frame-name").textContent = file.name;
    field.id = "box-" + Math.random().toString(36).slice(2);
    node.querySelector(".box-label").htmlFor = field.id;

    function draw() {
      ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
      if (!box) { return; }
      var x = box.x * scale, y = box.y * scale, w = box.w * scale, h = box.h * scale;
      ctx.fillStyle = "rgba(0, 0, 0, 0.35)";       // dim what lies outside the box
      ctx.fillRect(0, 0, canvas.width, y);
      ctx.fillRect(0, y + h, canvas.width, canvas.height - y - h);
      ctx.fillRect(0, y, x, h);
      ctx.fillRect(x + w, y, canvas.width - x - w, h);
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#ffd400";
      ctx.strokeRect(x + 1, y + 1, Math.max(0, w - 2), Math.max(0, h - 2));
    }
    function setBox(b, fromField) {
      box = b;
      button.disabled = !box;
      if (!fromField) { field.value = box ? Box.format(box) : ""; }
      field.setAttribute("aria-invalid", fromField && !box && field.value.trim() ? "true" : "false");
      draw();
    }
    function point(e) {
      var r = canvas.getBoundingClientRect();
      return { x: (e.clientX - r.left) * canvas.width / r.width, y: (e.clientY - r.top) * canvas.height / r.height };
    }
    canvas.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) { return; }
      e.preventDefault();
      canvas.setPointerCapture(e.pointerId);
      drag = point(e);
      before = box;
    });
    // a drag too short to be a box (a click) keeps the box there was
    function follow(e) {
      var p = point(e);
      setBox(Box.fromDrag(drag.x, drag.y, p.x, p.y, scale, image.naturalWidth, image.naturalHeight) || before);
    }
    canvas.addEventListener("pointermove", function (e) { if (drag) { follow(e); } });
    canvas.addEventListener("pointerup", function (e) { if (drag) { follow(e); drag = null; } });
    canvas.addEventListener("pointercancel", function () { if (drag) { setBox(before); drag = null; } });
    field.addEventListener("input", function () {
      setBox(Box.parse(field.value, image.naturalWidth, image.naturalHeight), true);
    });
    button.addEventListener("click", function () {
      if (!box) { return; }
      var part = Box.visible(box, image.naturalWidth, image.naturalHeight);
      var crop = document.createElement("canvas");
      crop.width = part.w; crop.height = part.h;
      crop.getContext("2d").drawImage(image, part.x, part.y, part.w, part.h, 0, 0, part.w, part.h);
      var boxed = { box: box, thumbnail: crop.toDataURL("image/png") };
      queue.push({ file: file, box: box, node: card(file, boxed) });
      pump();
    });
    node.querySelector(".close").addEventListener("click", function () {
      URL.revokeObjectURL(image.src);
      node.remove();
    });
    image.onload = function () {
      scale = Box.fit(image.naturalWidth, image.naturalHeight, FRAME_MAX.width, FRAME_MAX.height);
      canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
      canvas.setAttribute("aria-label", file.name + ", " + image.naturalWidth + "×" + image.naturalHeight +
        " pixels: drag a rectangle around the organism");
      node.querySelector(".frame-size").textContent = image.naturalWidth + "×" + image.naturalHeight + " px";
      node.classList.add("loaded");
      draw();
    };
    image.onerror = function () {
      node.querySelector(".frame-size").textContent = "this browser cannot show the image";
    };
    image.src = URL.createObjectURL(file);
    $("frames").prepend(node);
  }

  function add(files) {
    files = Array.prototype.slice.call(files);
    ready.then(function () {
      files.forEach(function (file) {
        if ($("use-box").checked) { frameEditor(file); } else { queue.push({ file: file, node: card(file) }); }
      });
      pump();
    });
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
}());
