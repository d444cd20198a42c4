//! A user's profile. Users are not created by a command: anyone with a valid token is a user.

use uuid::Uuid;

use crate::event::UserProfileUpdated;
use crate::{Aggregate, DomainError, Event, rules};

#[derive(Debug, Clone, Default)]
pub struct User {
    pub display_name: Option<String>,
}

impl Aggregate for User {
    fn apply(&mut self, event: &Event) {
        if let Event::UserProfileUpdated(e) = event {
            self.display_name = Some(e.display_name.clone());
        }
    }
}

impl User {
    pub fn update_profile(&self, user_id: Uuid, display_name: &str) -> Result<Vec<Event>, DomainError> {
        rules::display_text("display_name", display_name)?;
        if self.display_name.as_deref() == Some(display_name) {
            return Ok(vec![]);
        }
        Ok(vec![UserProfileUpdated { user_id, display_name: display_name.to_owned() }.into()])
    }
}
