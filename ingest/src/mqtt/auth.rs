//! Who a device is and what it may do at the embedded broker's door: the CONNECT
//! packet, passwords (argon2), topic ACLs with `{client_id}`, and the CONNACK that
//! refuses a device.
//!
//! rumqttd has no authorization of its own, and its authentication hook sees neither
//! the TLS session nor the topics a client publishes to, so the door does both: it
//! reads the CONNECT before it connects the device to rumqttd, and it reads the topic
//! of each PUBLISH and the filters of each SUBSCRIBE on the way through
//! (see [`crate::mqtt::inspect`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use sluice_config::{AclConfig, DeviceAuth};
use sluice_core::reload::Reloading;

/// MQTT 3.1.1 CONNACK return codes the door sends when it refuses a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x01: a protocol level the door does not speak (it speaks 3.1 and 3.1.1, and 5
    /// by translating it: `crate::mqtt::v5`), or a CONNECT it cannot read.
    Protocol,
    /// 0x02: the client id is not the authenticated identity.
    ClientId,
    /// 0x03: the door cannot check the CONNECT in time (every password check busy).
    Busy,
    /// 0x04: no, unknown or wrong user name and password.
    BadCredentials,
    /// 0x05: no usable certificate, or a will topic outside the ACL.
    NotAuthorized,
    /// MQTT 5 only (0x8C): enhanced authentication, which the door does not speak.
    AuthMethod,
}

impl Refusal {
    /// The CONNACK return code.
    pub fn code(self) -> u8 {
        match self {
            Self::Protocol => 1,
            Self::ClientId => 2,
            Self::Busy => 3,
            Self::BadCredentials => 4,
            Self::NotAuthorized | Self::AuthMethod => 5,
        }
    }

    /// The CONNACK reason code for an MQTT 5 device.
    pub fn code_v5(self) -> u8 {
        match self {
            Self::Protocol => 0x81,
            Self::ClientId => 0x85,
            Self::Busy => 0x89,
            Self::BadCredentials => 0x86,
            Self::NotAuthorized => 0x87,
            Self::AuthMethod => 0x8C,
        }
    }

    /// The `reason` label of `sluice_broker_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Protocol => "protocol",
            Self::ClientId => "client_id",
            Self::Busy => "busy",
            Self::BadCredentials => "bad_credentials",
            Self::NotAuthorized => "not_authorized",
            Self::AuthMethod => "auth_method",
        }
    }

    /// The CONNACK packet (session present 0).
    pub fn connack(self) -> [u8; 4] {
        [0x20, 0x02, 0x00, self.code()]
    }
}

/// The parts of a CONNECT packet the door checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol level: 3 (MQTT 3.1), 4 (3.1.1), 5.
    pub level: u8,
    /// Client identifier.
    pub client_id: String,
    /// The will message's topic, if it sets one.
    pub will_topic: Option<String>,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Vec<u8>>,
}

/// Reads a CONNECT packet's body (after the fixed header). `None` if it is not one
/// the door can read: a malformed packet. An MQTT 5 one is read only as far as its
/// level (the door downgrades it first: `crate::mqtt::v5::downgrade_connect`).
pub fn parse_connect(body: &[u8]) -> Option<Connect> {
    let mut r = Reader(body);
    let name = r.string()?;
    if name != "MQTT" && name != "MQIsdp" {
        return None;
    }
    let level = r.byte()?;
    let flags = r.byte()?;
    r.take(2)?; // keep alive
    if level == 5 {
        return Some(Connect {
            level,
            client_id: String::new(),
            will_topic: None,
            username: None,
            password: None,
        });
    }
    let client_id = r.string()?.to_owned();
    let will_topic = if flags & 0x04 != 0 {
        let topic = r.string()?.to_owned();
        r.binary()?;
        Some(topic)
    } else {
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?.to_owned())
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    Some(Connect {
        level,
        client_id,
        will_topic,
        username,
        password,
    })
}

/// Clears the will retain flag of a CONNECT's body (after the fixed header).
pub fn clear_will_retain(body: &mut [u8]) {
    let name = body
        .get(..2)
        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])));
    if let Some(flags) = name.and_then(|n| body.get_mut(2 + n + 1)) {
        *flags &= !0x20;
    }
}

/// A cursor over an MQTT packet body.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn binary(&mut self) -> Option<&'a [u8]> {
        let len = self.take(2)?;
        self.take(usize::from(u16::from_be_bytes([len[0], len[1]])))
    }

    pub(crate) fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.binary()?).ok()
    }

    /// An MQTT 5 variable byte integer (a property length).
    pub(crate) fn varint(&mut self) -> Option<usize> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.byte()?;
            value |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// Reads the topic filters of a SUBSCRIBE packet's body; `None` if malformed.
pub fn subscribe_filters(body: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader(body);
    r.take(2)?; // packet id
    let mut filters = Vec::new();
    while !r.0.is_empty() {
        filters.push(r.string()?.to_owned());
        r.byte()?; // requested QoS
    }
    Some(filters)
}

/// One level of an ACL pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Name(String),
    /// `+`: any one level.
    Plus,
    /// `#`: this level and all below.
    Hash,
    /// `{client_id}`: one level equal to the device's identity.
    ClientId,
}

/// An ACL pattern: an MQTT filter whose levels may be `{client_id}`.
#[derive(Debug, Clone)]
struct Pattern(Vec<Level>);

impl Pattern {
    fn parse(text: &str) -> Self {
        Self(
            text.split('/')
                .map(|l| match l {
                    "+" => Level::Plus,
                    "#" => Level::Hash,
                    "{client_id}" => Level::ClientId,
                    name => Level::Name(name.to_owned()),
                })
                .collect(),
        )
    }

    /// Whether every topic `filter` matches is one this pattern allows `identity`
    /// (for a topic name, whether it matches). `$` topics match only a pattern that
    /// names their first level.
    fn covers(&self, identity: &str, filter: &str) -> bool {
        let mut levels = filter.split('/');
        for (i, pattern) in self.0.iter().enumerate() {
            let level = levels.next();
            if i == 0
                && level.is_some_and(|l| l.starts_with('$'))
                && !matches!(pattern, Level::Name(_))
            {
                return false;
            }
            match (pattern, level) {
                (Level::Hash, _) => return true,
                (_, None) => return false,
                (_, Some("#")) => return false,
                (Level::Plus, Some(_)) => {}
                (_, Some("+")) => return false,
                (Level::ClientId, Some(l)) if l == identity => {}
                (Level::Name(name), Some(l)) if name == l => {}
                _ => return false,
            }
        }
        levels.next().is_none()
    }

    /// The level of `topic` at this pattern's `{client_id}`, if the topic matches it
    /// with any identity there.
    fn identity_in<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let at = self.0.iter().position(|l| *l == Level::ClientId)?;
        let identity = topic.split('/').nth(at)?;
        self.covers(identity, topic).then_some(identity)
    }
}

/// `[broker.acl]`: the topics a device may publish to and the filters it may subscribe
/// to, `{client_id}` being its identity.
#[derive(Debug, Clone)]
pub struct Acl {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
}

impl Acl {
    /// The ACL of `[broker.acl]` (its patterns are checked by `sluice check`).
    pub fn new(config: &AclConfig) -> Self {
        Self {
            publish: config.publish.iter().map(|p| Pattern::parse(p)).collect(),
            subscribe: config.subscribe.iter().map(|p| Pattern::parse(p)).collect(),
        }
    }

    /// Whether `identity` may publish to `topic`.
    pub fn may_publish(&self, identity: &str, topic: &str) -> bool {
        self.publish.iter().any(|p| p.covers(identity, topic))
    }

    /// Whether `identity` may subscribe to `filter`: every topic it matches is allowed.
    pub fn may_subscribe(&self, identity: &str, filter: &str) -> bool {
        self.subscribe.iter().any(|p| p.covers(identity, filter))
    }

    /// The identity `topic` was published under: its level at `{client_id}` in the
    /// first publish pattern it matches that has one. The door lets a device publish
    /// only where `{client_id}` is its own identity, so this is who published it.
    pub fn publisher_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        self.publish.iter().find_map(|p| p.identity_in(topic))
    }
}

/// The devices' password hashes, from `[broker] passwords_file` (`<device>:<argon2
/// PHC string>` per line; `#` comments), re-read when the file changes.
#[derive(Debug)]
pub struct Passwords(Reloading<HashMap<String, String>>);

impl Passwords {
    /// Reads `path`; every bad line is an error naming its line number.
    pub fn load(path: &Path) -> Result<Self, String> {
        let load = Box::new(|files: &[PathBuf]| read_passwords(&files[0]));
        Reloading::new("the devices' passwords file", vec![path.to_owned()], load).map(Self)
    }

    /// Whether `password` is `device`'s. Slow by design (argon2): call it off the
    /// async runtime.
    pub fn verify(&self, device: &str, password: &[u8]) -> bool {
        let hashes = self.0.current();
        let Some(hash) = hashes.get(device) else {
            return false;
        };
        PasswordHash::new(hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password, &h)
                .is_ok()
        })
    }
}

fn read_passwords(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read passwords file {}: {e}", path.display()))?;
    let mut hashes = HashMap::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((device, hash)) if !device.is_empty() && PasswordHash::new(hash).is_ok() => {
                hashes.insert(device.to_owned(), hash.to_owned());
            }
            _ => problems.push(format!(
                "line {}: want <device id>:<argon2 hash> (make one with `sluice passwd`)",
                n + 1
            )),
        }
    }
    if problems.is_empty() {
        Ok(hashes)
    } else {
        Err(format!(
            "passwords file {}: {}",
            path.display(),
            problems.join("; ")
        ))
    }
}

/// A `passwords_file` line for `device` and `password`: an argon2id hash with a fresh
/// random salt.
pub fn password_line(device: &str, password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    if device.is_empty() || device.contains([':', '/', '+', '#']) {
        return Err(format!(
            "{device:?} cannot be a device id: it must be non-empty, without ':', '/', '+' or '#'"
        ));
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| e.to_string())?;
    Ok(format!("{device}:{hash}"))
}

/// Decides who a connecting device is, by its listener's authentication.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// The listener's method.
    pub auth: DeviceAuth,
    /// `[broker] passwords_file`, for `auth = "password"`.
    pub passwords: Option<std::sync::Arc<Passwords>>,
    /// `[broker.acl]`, whose publish patterns a will topic must match.
    pub acl: Option<std::sync::Arc<Acl>>,
}

impl Authenticator {
    /// The identity of the device that sent `connect`, or why it is refused.
    /// `certificate_name` is the common name of its TLS client certificate, if any.
    /// Checks a password with argon2: call it off the async runtime.
    pub fn identify(
        &self,
        connect: Option<&Connect>,
        certificate_name: Option<&str>,
    ) -> Result<String, (Refusal, String)> {
        let Some(connect) = connect else {
            return Err((Refusal::Protocol, "unreadable CONNECT".into()));
        };
        if !(3..=4).contains(&connect.level) {
            return Err((
                Refusal::Protocol,
                format!(
                    "MQTT protocol level {} (3.1, 3.1.1 and 5 are spoken)",
                    connect.level
                ),
            ));
        }
        let identity = match self.auth {
            DeviceAuth::None => connect.client_id.clone(),
            DeviceAuth::Password => {
                let (Some(user), Some(password)) = (&connect.username, &connect.password) else {
                    return Err((Refusal::BadCredentials, "no user name and password".into()));
                };
                let known = self
                    .passwords
                    .as_ref()
                    .is_some_and(|p| p.verify(user, password));
                if !known {
                    return Err((
                        Refusal::BadCredentials,
                        format!("wrong password or unknown device {user:?}"),
                    ));
                }
                user.clone()
            }
            DeviceAuth::Certificate => match certificate_name {
                Some(name) => name.to_owned(),
                None => {
                    return Err((
                        Refusal::NotAuthorized,
                        "its certificate has no common name".into(),
                    ));
                }
            },
        };
        if self.auth != DeviceAuth::None && connect.client_id != identity {
            return Err((
                Refusal::ClientId,
                format!(
                    "client id {:?} is not its identity {identity:?}",
                    connect.client_id
                ),
            ));
        }
        if let (Some(acl), Some(topic)) = (&self.acl, &connect.will_topic)
            && !acl.may_publish(&identity, topic)
        {
            return Err((
                Refusal::NotAuthorized,
                format!("will topic {topic:?} is outside its ACL"),
            ));
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(publish: &[&str], subscribe: &[&str]) -> Acl {
        Acl::new(&AclConfig {
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn a_device_may_publish_only_under_its_own_identity() {
        let acl = acl(
            &["devices/{client_id}/#", "status/+"],
            &["commands/{client_id}"],
        );
        assert!(acl.may_publish("d1", "devices/d1/telemetry"));
        assert!(acl.may_publish("d1", "devices/d1"));
        assert!(!acl.may_publish("d1", "devices/d2/telemetry"));
        assert!(!acl.may_publish("d1", "devices"));
        assert!(acl.may_publish("d1", "status/x"));
        assert!(!acl.may_publish("d1", "status/x/y"));
        assert!(!acl.may_publish("d1", "other"));
        assert!(!acl.may_publish("d1", "$SYS/x"));
        assert!(acl.may_subscribe("d1", "commands/d1"));
        assert!(
            !acl.may_subscribe("d1", "commands/+"),
            "+ would reach others"
        );
        assert!(!acl.may_subscribe("d1", "#"));
        let open = self::acl(&["#"], &["devices/+/#"]);
        assert!(open.may_subscribe("x", "devices/+/telemetry"));
        assert!(!open.may_subscribe("x", "devices/#/x"));
        assert!(
            !open.may_publish("x", "$SYS/broker"),
            "# reaches no $ topic"
        );
    }

    #[test]
    fn the_publisher_of_a_topic_is_its_level_at_client_id() {
        let acl = acl(&["status/+", "devices/{client_id}/#"], &[]);
        assert_eq!(acl.publisher_of("devices/d7/telemetry"), Some("d7"));
        assert_eq!(acl.publisher_of("status/x"), None);
        assert_eq!(acl.publisher_of("elsewhere/d7"), None);
    }

    fn connect_body(
        client: &str,
        user: Option<&str>,
        password: Option<&str>,
        will: Option<&str>,
    ) -> Vec<u8> {
        let s = |v: &mut Vec<u8>, t: &[u8]| {
            v.extend_from_slice(&(t.len() as u16).to_be_bytes());
            v.extend_from_slice(t);
        };
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04;
        }
        if user.is_some() {
            flags |= 0x80;
        }
        if password.is_some() {
            flags |= 0x40;
        }
        let mut b = Vec::new();
        s(&mut b, b"MQTT");
        b.extend_from_slice(&[4, flags, 0, 30]);
        s(&mut b, client.as_bytes());
        if let Some(w) = will {
            s(&mut b, w.as_bytes());
            s(&mut b, b"bye");
        }
        if let Some(u) = user {
            s(&mut b, u.as_bytes());
        }
        if let Some(p) = password {
            s(&mut b, p.as_bytes());
        }
        b
    }

    #[test]
    fn a_wills_retain_flag_is_cleared() {
        let mut body = connect_body("d1", None, None, Some("devices/d1/status"));
        body[7] |= 0x20;
        let before = body.clone();
        clear_will_retain(&mut body);
        assert_eq!(body[7], before[7] & !0x20);
        assert_eq!(body[..7], before[..7]);
        assert_eq!(body[8..], before[8..]);
        // Too short to hold its flags: left as it is.
        let mut short = vec![0, 4, b'M'];
        clear_will_retain(&mut short);
        assert_eq!(short, [0, 4, b'M']);
    }

    #[test]
    fn connect_packets_are_read_and_devices_identified_or_refused_with_their_code() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        std::fs::write(
            &file,
            format!("# devices\n{}\n", password_line("d1", "s3cret").unwrap()),
        )
        .unwrap();
        let auth = Authenticator {
            auth: DeviceAuth::Password,
            passwords: Some(std::sync::Arc::new(Passwords::load(&file).unwrap())),
            acl: Some(std::sync::Arc::new(acl(&["devices/{client_id}/#"], &[]))),
        };
        let id = |body: Vec<u8>| {
            auth.identify(parse_connect(&body).as_ref(), None)
                .map_err(|(r, _)| r)
        };
        assert_eq!(
            id(connect_body("d1", Some("d1"), Some("s3cret"), None)),
            Ok("d1".into())
        );
        assert_eq!(
            id(connect_body("d1", Some("d1"), Some("wrong"), None)),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            id(connect_body("d1", None, None, None)),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            id(connect_body("d2", Some("d1"), Some("s3cret"), None)),
            Err(Refusal::ClientId)
        );
        assert_eq!(
            id(connect_body(
                "d1",
                Some("d1"),
                Some("s3cret"),
                Some("devices/d2/status")
            )),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            id(b"\x00\x04MQTT\x04".to_vec()),
            Err(Refusal::Protocol),
            "truncated"
        );
        let certs = Authenticator {
            auth: DeviceAuth::Certificate,
            passwords: None,
            acl: None,
        };
        let body = connect_body("d1", None, None, None);
        assert_eq!(
            certs.identify(parse_connect(&body).as_ref(), Some("d1")),
            Ok("d1".into())
        );
        assert_eq!(
            certs
                .identify(parse_connect(&body).as_ref(), Some("d2"))
                .map_err(|(r, _)| r),
            Err(Refusal::ClientId)
        );
        assert_eq!(Refusal::BadCredentials.connack(), [0x20, 2, 0, 4]);
        assert!(Passwords::load(dir.path().join("none").as_path()).is_err());
        std::fs::write(&file, "d1:plaintext\n").unwrap();
        let err = Passwords::load(&file).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
