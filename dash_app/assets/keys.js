// Keyboard use of the header's search, and labels Dash components cannot take as props.
// Search: the arrow keys move through the suggestions, Enter opens the highlighted one (or the
// first; pressed before the suggestions for the typed text arrive, it opens their first), and
// Escape or a click outside the box closes them.
(function () {
  let pending = false;   // text typed whose suggestions have not arrived yet
  let wanted = false;    // Enter pressed while they were pending
  let last = null;       // the suggestions last seen

  const box = () => document.querySelector('.search');
  const hits = () => Array.from(document.querySelectorAll('#search-suggestions .search-hit'));
  const close = () => { const b = box(); if (b) { b.classList.add('closed'); } };
  const show = () => { const b = box(); if (b) { b.classList.remove('closed'); } };

  function open(hit) {
    wanted = false;
    close();
    hit.click();
  }

  function move(step) {
    const all = hits();
    if (!all.length) { return; }
    let at = all.findIndex(h => h.classList.contains('active'));
    all.forEach(h => h.classList.remove('active'));
    at = at < 0 ? (step > 0 ? 0 : all.length - 1) : (at + step + all.length) % all.length;
    all[at].classList.add('active');
    all[at].scrollIntoView({block: 'nearest'});
  }

  document.addEventListener('input', e => {
    if (e.target && e.target.id === 'search') { pending = true; show(); }
  });
  document.addEventListener('keydown', e => {
    if (!e.target || e.target.id !== 'search') { return; }
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      show();
      move(e.key === 'ArrowDown' ? 1 : -1);
    } else if (e.key === 'Enter') {
      e.preventDefault();
      const all = hits();
      const active = all.find(h => h.classList.contains('active'));
      if (active) { open(active); } else if (all.length && !pending) { open(all[0]); } else {
        wanted = true;
      }
    } else if (e.key === 'Escape') {
      e.preventDefault();   // keep the text (a search field would clear it)
      wanted = false;
      close();
    }
  });
  document.addEventListener('click', e => {
    const b = box();
    if (b && !b.contains(e.target)) { close(); }
  });

  new MutationObserver(() => {
    const list = document.getElementById('search-suggestions');
    const now = list ? list.innerHTML : null;
    if (now !== last) {
      last = now;
      pending = false;
      const all = hits();
      if (wanted && all.length) { open(all[0]); }
    }
    // dcc.Upload's file input takes no label of its own: name it after its drop zone.
    document.querySelectorAll('.dropzone input[type=file]:not([aria-label])').forEach(
      input => input.setAttribute('aria-label', 'Choose an image to upload'));
  }).observe(document.documentElement, {childList: true, subtree: true});
})();
