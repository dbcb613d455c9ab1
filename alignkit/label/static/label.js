// alignkit label: keyboard shortcuts, drag-to-rank and small conveniences for the label page.
// Everything here is optional: the forms work without this script (server-side validation).
"use strict";

(function () {
  const list = document.getElementById("responses");
  const labelForm = document.getElementById("label-form");
  const help = document.getElementById("help");
  const flagHint = document.getElementById("flag-hint");
  let submitting = false;
  let flagging = false;

  const cards = () => (list ? Array.from(list.querySelectorAll(".card")) : []);
  const rankEnabled = () => list && list.dataset.rank === "True";
  const rateEnabled = () => list && list.dataset.rate === "True";
  const scale = () => (list ? Number(list.dataset.scale) : 0);

  function submit(form) {
    // One submission per page: a second Enter must not post the next item's answer twice.
    if (!form || submitting) return;
    submitting = true;
    form.requestSubmit();
  }

  document.addEventListener("submit", (event) => {
    if (event.target.method === "dialog") return;
    submitting = true;
    document.querySelectorAll(".actions button").forEach((b) => { b.disabled = true; });
  });

  // ---- ranks and ratings ------------------------------------------------------------------

  function markRank(card) {
    const select = card.querySelector("select[name^='rank-']");
    card.dataset.rank = select && select.value ? select.value : "";
  }

  function setRank(card, rank) {
    const select = card.querySelector("select[name^='rank-']");
    const k = cards().length;
    if (!select || rank < 1 || rank > k) return;
    select.value = String(rank);
    markRank(card);
  }

  function setRating(card, rating) {
    if (rating < 1 || rating > scale()) return;
    const radio = card.querySelector(`input[type=radio][value="${rating}"]`);
    if (radio) radio.checked = true;
  }

  function renumber() {
    // Dragging states a full order: the list from top to bottom becomes ranks 1..K.
    cards().forEach((card, index) => setRank(card, index + 1));
  }

  // ---- focus and moving -------------------------------------------------------------------

  function focusCard(index) {
    const all = cards();
    if (!all.length) return;
    const card = all[Math.max(0, Math.min(all.length - 1, index))];
    card.focus();
    card.scrollIntoView({ block: "nearest" });
  }

  function moveCard(card, step) {
    const all = cards();
    const index = all.indexOf(card);
    const target = all[index + step];
    if (!target) return;
    list.insertBefore(card, step < 0 ? target : target.nextSibling);
    renumber();
    card.focus();
  }

  // ---- drag and drop: only from the handle, so text in a response stays selectable --------

  if (list && rankEnabled()) {
    let dragged = null;
    let before = "";
    list.addEventListener("mousedown", (event) => {
      const card = event.target.closest(".card");
      if (card) card.draggable = Boolean(event.target.closest(".handle"));
    });
    list.addEventListener("dragstart", (event) => {
      dragged = event.target.closest(".card");
      if (!dragged) return;
      before = cards().map((c) => c.id).join();
      dragged.classList.add("dragging");
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", dragged.id);
    });
    list.addEventListener("dragover", (event) => {
      if (!dragged) return;
      event.preventDefault();
      const over = event.target.closest(".card");
      if (!over || over === dragged) return;
      const box = over.getBoundingClientRect();
      const after = event.clientY > box.top + box.height / 2;
      list.insertBefore(dragged, after ? over.nextSibling : over);
    });
    list.addEventListener("drop", (event) => event.preventDefault());
    list.addEventListener("dragend", () => {
      if (!dragged) return;
      dragged.classList.remove("dragging");
      dragged.draggable = false;
      if (cards().map((c) => c.id).join() !== before) renumber();
      dragged.focus();
      dragged = null;
    });
    list.addEventListener("change", (event) => {
      const card = event.target.closest(".card");
      if (card) markRank(card);
    });
    cards().forEach(markRank);
  }

  // ---- keyboard ---------------------------------------------------------------------------

  function toggleHelp() {
    if (!help) return;
    if (help.open) help.close();
    else help.showModal();
  }

  function setFlagging(on) {
    flagging = on;
    document.body.classList.toggle("flagging", on);
    if (flagHint) flagHint.hidden = !on;
  }

  function flagAs(reason) {
    const form = document.getElementById("flag-form");
    const select = document.getElementById("flag-reason");
    setFlagging(false);
    if (!form || !select) return;
    select.value = reason;
    submit(form);
  }

  function clickIfEnabled(id) {
    const button = document.getElementById(id);
    if (button && !button.disabled) submit(button.form);
  }

  function digitOf(event) {
    // event.code, because Shift turns "1" into "!" in event.key.
    const match = /^(?:Digit|Numpad)(\d)$/.exec(event.code || "");
    if (match) return Number(match[1]);
    return /^\d$/.test(event.key) ? Number(event.key) : null;
  }

  function inTextBox(target) {
    return target.matches("textarea, input[type=text], input:not([type])");
  }

  function handleTextBox(event) {
    if (event.key === "Escape") {
      const card = event.target.closest(".card");
      if (card) card.focus();
      else event.target.blur();
      event.preventDefault();
    } else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit(labelForm);
    }
  }

  function handleFlagMode(event) {
    const digit = digitOf(event);
    if (digit === 1) flagAs("unsafe");
    else if (digit === 2) flagAs("unclear");
    else if (event.key === "Escape") setFlagging(false);
    event.preventDefault();
  }

  function handleDigit(event, card) {
    let digit = digitOf(event);
    if (digit === null || !card) return false;
    if (event.shiftKey || !rankEnabled()) {
      if (!rateEnabled()) return false;
      setRating(card, digit === 0 ? 10 : digit);
    } else {
      setRank(card, digit);
    }
    return true;
  }

  function handleArrow(event, card) {
    const index = card ? cards().indexOf(card) : -1;
    if (event.altKey && card && rankEnabled()) {
      if (event.key === "ArrowUp") moveCard(card, -1);
      else if (event.key === "ArrowDown") moveCard(card, 1);
      else return false;
      return true;
    }
    if (event.target.matches("input[type=radio], select")) return false; // their own arrows
    if (event.key === "ArrowDown" || event.key === "ArrowRight") focusCard(index + 1);
    else if (event.key === "ArrowUp" || event.key === "ArrowLeft") focusCard(index - 1);
    else return false;
    return true;
  }

  function handleLetter(event, card) {
    switch (event.key) {
      case "?": toggleHelp(); return true;
      case "s": clickIfEnabled("skip-button"); return true;
      case "u": clickIfEnabled("undo-button"); return true;
      case "f":
        if (document.getElementById("flag-form")) setFlagging(true);
        return true;
      case "c": {
        const box = card && card.querySelector("textarea");
        if (box) box.focus();
        return Boolean(box);
      }
      case "Enter":
        if (event.target.matches("button, a")) return false; // activates itself
        submit(event.target.form || labelForm);
        return true;
      default:
        return false;
    }
  }

  document.addEventListener("keydown", (event) => {
    if (help && help.open) {
      if (event.key === "?") { help.close(); event.preventDefault(); }
      return;
    }
    if (inTextBox(event.target)) { handleTextBox(event); return; }
    if (flagging) { handleFlagMode(event); return; }
    if (event.ctrlKey || event.metaKey) return; // the browser's own shortcuts
    const card = event.target.closest ? event.target.closest(".card") : null;
    const handled =
      handleArrow(event, card) ||
      (!event.altKey && handleDigit(event, card)) ||
      (!event.altKey && handleLetter(event, card));
    if (handled) event.preventDefault();
  });

  const helpButton = document.getElementById("help-button");
  if (helpButton) helpButton.addEventListener("click", toggleHelp);

  // Start on the first response so the keys work at once.
  if (list) focusCard(0);
})();
