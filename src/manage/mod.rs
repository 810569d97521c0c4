//! Managing the store: `sharedloop ls`, `rm`, `gc` and `verify`.
//!
//! All four start from an [`Inventory`]: one pass over `layers/` and
//! `names/` of both store directories (root and fallback), and from
//! [`Users`]: what this node is using right now, from the mount records in
//! the state directory and from the loop devices attached (every
//! `/sys/block/loopN`, not only those /proc/partitions lists, matched to a
//! layer image by device and inode, or by path where the device cannot be
//! opened), and from locks on the image (`F_OFD_GETLK`: any lock another
//! process or, where the filesystem passes locks on, another node holds).
//!
//! Everything is read and removed through store directory fds
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `unlinkat`): a symlink planted
//! in a shared store is refused or removed as a link, never followed.
//!
//! # What is referenced
//!
//! A layer is *needed* when it is in the chain of any name (in either store
//! directory; a name shadowed by the same name in the root still counts) or
//! when it is the parent of a layer that stays. A layer can be stored in
//! both directories; IDs are what count, and removing a layer removes every
//! stored copy of it.
//!
//! # Where things are
//!
//! - `inventory`: what is stored ([`Inventory`]);
//! - `users`: what this node uses ([`Users`]);
//! - `removal`: taking names and layers out of the store, for `rm` and `gc`;
//! - `temporaries`: what `gc` makes of what crashed processes left, and the
//!   claims of imports still at work;
//! - `ls`, `elsewhere` (what other nodes hold, for `ls` and `status`),
//!   `rm`, `gc`, `verify`: the commands;
//! - `usage`: what a layer, upper or temporary occupies (allocated and
//!   apparent bytes), the one source of every size reported;
//! - `human`: sizes, ages and tables for people.

mod configs;
mod elsewhere;
mod gc;
mod human;
mod inventory;
mod ls;
mod removal;
mod rm;
pub mod status;
mod temporaries;
mod usage;
mod users;
mod verify;

pub use elsewhere::{Elsewhere, UpperElsewhere, held_elsewhere};
pub use gc::{GcOptions, GcReport, RemovedTemporary, gc, parse_duration};
pub use human::{human_size, table};
pub use inventory::{ImageInfo, Inventory, Problem, StoredLayer, StoredName};
pub use ls::{ImageEntry, ImageLayer, ImageView, LayerEntry, Listing, MountUse, image_view, listing, ls, render, render_image};
pub use removal::{RemovedLayer, RemovedName};
pub use rm::{RmOptions, RmReport, rm};
pub use usage::Usage;
pub use users::Users;
pub use verify::{Check, VerifyOptions, VerifyReport, verify};

/// Device and inode of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}
